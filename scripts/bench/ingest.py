#!/usr/bin/env python3
"""POSTs every Synthea bundle in a directory to a FHIR server (the shared
Organization/Practitioner bundles first), one bundle at a time, and reports
the ingest rate: resources stored (entries answered 2xx) per second.

    ingest.py [--only LIST] [--loaded OUT] [--keep-going] BASE FOLDER

--only LIST      post only the bundles named in LIST (one file name a line)
--loaded OUT     write the names of the bundles the server accepted to OUT
--keep-going     a refused bundle is reported and skipped (exit status 0);
                 without it the first refusal ends the run (status 1)

Works against ehrx and other FHIR servers (scripts/bench/peer.sh also loads
Helios with it)."""
import argparse, json, os, sys, time, urllib.error, urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("--only")
ap.add_argument("--loaded")
ap.add_argument("--keep-going", action="store_true")
ap.add_argument("base")
ap.add_argument("folder")
args = ap.parse_args()

files = sorted((n for n in os.listdir(args.folder) if n.endswith(".json")),
               key=lambda n: (not n.startswith(("hospital", "practitioner")), n))
if args.only:
    wanted = set(open(args.only).read().split())
    files = [n for n in files if n in wanted]
resources = refused_entries = 0
loaded, refused = [], []
start = time.perf_counter()
for name in files:
    body = open(os.path.join(args.folder, name), "rb").read()
    req = urllib.request.Request(args.base + "/", data=body, method="POST",
                                 headers={"Content-Type": "application/fhir+json",
                                          "Accept": "application/fhir+json",
                                          "Prefer": "return=minimal"})
    try:
        with urllib.request.urlopen(req) as r:
            resp = json.load(r)
    except urllib.error.HTTPError as e:
        detail = e.read(600).decode("utf-8", "replace").replace("\n", " ")
        print(f"refused: {name}: HTTP {e.code}: {detail}", file=sys.stderr)
        refused.append(name)
        if not args.keep_going:
            sys.exit(1)
        continue
    loaded.append(name)
    for entry in resp.get("entry", []):
        if str(entry.get("response", {}).get("status", "")).startswith("2"):
            resources += 1
        else:
            refused_entries += 1
elapsed = time.perf_counter() - start
if args.loaded:
    with open(args.loaded, "w") as f:
        f.write("".join(n + "\n" for n in loaded))
extra = ""
if refused:
    extra += f", {len(refused)} bundles refused"
if refused_entries:
    extra += f", {refused_entries} entries not stored"
print(f"{len(loaded)} bundles, {resources} resources in {elapsed:.1f} s: "
      f"{resources / elapsed:.0f} resources/s{extra}")
