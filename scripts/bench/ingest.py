#!/usr/bin/env python3
"""POSTs every Synthea bundle in a directory to an ehrx server (the shared
Organization/Practitioner bundles first) and reports the ingest rate."""
import json, os, sys, time, urllib.request

base, folder = sys.argv[1], sys.argv[2]
files = sorted(os.listdir(folder), key=lambda n: (not n.startswith(("hospital", "practitioner")), n))
resources = 0
start = time.perf_counter()
for name in files:
    body = open(os.path.join(folder, name), "rb").read()
    req = urllib.request.Request(base + "/", data=body, method="POST",
                                 headers={"Content-Type": "application/fhir+json", "Prefer": "return=minimal"})
    with urllib.request.urlopen(req) as r:
        resp = json.load(r)
    resources += len(resp.get("entry", []))
elapsed = time.perf_counter() - start
print(f"{len(files)} bundles, {resources} resources in {elapsed:.1f} s: {resources / elapsed:.0f} resources/s")
