#!/usr/bin/env python3
"""Loads the Synthea set into an ehrx server COPIES times with fresh ids and
names, to reach a benchmark size (9 copies of the 27 HIV patients plus the
shared Organization/Practitioner bundles: about 108,000 resources).

    scripts/bench/replicate.py BASE_URL SYNTHEA_DIR COPIES [WORKERS]

Every copy gets new urn:uuid fullUrls (so the server assigns new ids) and
the patients' family names get the copy number appended ("Keeling57c3"), so
name searches have a known number of matches. Prints the resource count
and the ingest rate.
"""
import json, os, sys, time, uuid, urllib.request
from concurrent.futures import ThreadPoolExecutor

base, folder, copies = sys.argv[1], sys.argv[2], int(sys.argv[3])
workers = int(sys.argv[4]) if len(sys.argv) > 4 else 2


def post(body):
    req = urllib.request.Request(base + "/", data=body, method="POST",
                                 headers={"Content-Type": "application/fhir+json",
                                          "Prefer": "return=minimal"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return len(json.load(r).get("entry", []))


def replace_all(v, mapping):
    if isinstance(v, str):
        return mapping.get(v, v)
    if isinstance(v, list):
        return [replace_all(x, mapping) for x in v]
    if isinstance(v, dict):
        return {k: replace_all(x, mapping) for k, x in v.items()}
    return v


def variant(bundle, copy):
    mapping = {e["fullUrl"]: "urn:uuid:" + str(uuid.uuid4())
               for e in bundle["entry"] if e.get("fullUrl", "").startswith("urn:uuid:")}
    out = replace_all(bundle, mapping)
    for e in out["entry"]:
        r = e["resource"]
        if r["resourceType"] == "Patient":
            for n in r.get("name", []):
                if "family" in n:
                    n["family"] = f"{n['family']}c{copy}"
            r.pop("identifier", None)  # Synthea identifiers would collide across copies
    return json.dumps(out).encode()


names = sorted(os.listdir(folder))
shared = [n for n in names if n.startswith(("hospital", "practitioner"))]
patients = [n for n in names if n not in shared]
bundles = [json.load(open(os.path.join(folder, n))) for n in patients]
start = time.perf_counter()
total = 0
for n in shared:
    total += post(open(os.path.join(folder, n), "rb").read())
jobs = [(b, c) for c in range(copies) for b in bundles]
with ThreadPoolExecutor(workers) as pool:
    for i, n in enumerate(pool.map(lambda j: post(variant(*j)), jobs)):
        total += n
        if (i + 1) % 27 == 0:
            print(f"  {i + 1}/{len(jobs)} bundles, {total} resources, "
                  f"{total / (time.perf_counter() - start):.0f} resources/s", flush=True)
elapsed = time.perf_counter() - start
print(f"loaded {total} resources in {elapsed:.0f} s: {total / elapsed:.0f} resources/s")
