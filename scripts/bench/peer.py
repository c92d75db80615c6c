#!/usr/bin/env python3
"""Helpers of scripts/bench/peer.sh (standard library only).

    peer.py helios-data DEFINITIONS OUT_DIR
        Writes Helios's data directory from the FHIR R4 core definitions:
        search-parameters-r4.json (the R4 SearchParameter Bundle, as is) and
        compartment-definitions-r4.json (a Bundle of the CompartmentDefinitions,
        without the `example` one).
    peer.py pick BUNDLE_DIR [LIST]
        Chooses the request shapes from the data files, so every server gets
        the same ones: the patient with the smallest Synthea identifier (among
        the bundles in LIST, if given), their family name and their most
        frequent Observation code (ties: the smallest). Prints
        `IDENTIFIER FAMILY SYSTEM|CODE`.
    peer.py id BASE IDENTIFIER [TOKEN]
        The server's id of the Patient with that Synthea identifier.
    peer.py matches BASE PATH [TOKEN]
        How many resources the search PATH matches on its first page.
    peer.py table RESULTS
        The summary: median req/s per server and shape, and the ratios.
"""
import json
import os
import statistics
import sys
import urllib.parse
import urllib.request

SYNTHEA = "https://github.com/synthetichealth/synthea"


def helios_data(definitions, out):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(definitions, "search-parameters.json"), "rb") as f:
        sp = f.read()
    with open(os.path.join(out, "search-parameters-r4.json"), "wb") as f:
        f.write(sp)
    folder = os.path.join(definitions, "compartmentdefinitions")
    entries = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as f:
            cd = json.load(f)
        if cd.get("resourceType") != "CompartmentDefinition" or cd.get("id") == "example":
            continue
        entries.append({"fullUrl": cd["url"], "resource": cd})
    bundle = {"resourceType": "Bundle", "id": "compartment-definitions-r4",
              "type": "collection", "entry": entries}
    with open(os.path.join(out, "compartment-definitions-r4.json"), "w") as f:
        json.dump(bundle, f)


def coding(obs):
    c = obs["code"]["coding"][0]
    return c["system"] + "|" + c["code"]


def pick(folder, listed=None):
    names = sorted(os.listdir(folder))
    if listed:
        with open(listed) as f:
            wanted = set(f.read().split())
        names = [n for n in names if n in wanted]
    best = None
    for name in names:
        with open(os.path.join(folder, name)) as f:
            bundle = json.load(f)
        if bundle.get("type") != "transaction":
            continue
        res = [e["resource"] for e in bundle.get("entry", []) if "resource" in e]
        for p in (r for r in res if r["resourceType"] == "Patient"):
            idents = [i["value"] for i in p.get("identifier", []) if i.get("system") == SYNTHEA]
            if not idents or not p.get("name"):
                continue
            ident = min(idents)
            if best is None or ident < best[0]:
                best = (ident, p, [r for r in res if r["resourceType"] == "Observation"])
    ident, patient, obs = best
    counts = {}
    for o in obs:
        counts[coding(o)] = counts.get(coding(o), 0) + 1
    code = min(counts, key=lambda c: (-counts[c], c))
    print(ident, patient["name"][0]["family"], code)


def get(base, path, token=None):
    headers = {"Accept": "application/fhir+json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    req = urllib.request.Request(base + "/" + path, headers=headers)
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def matches(bundle):
    return [e for e in bundle.get("entry", [])
            if e.get("search", {}).get("mode", "match") == "match"]


def patient_id(base, ident, token=None):
    q = urllib.parse.quote(SYNTHEA + "|" + ident)
    found = matches(get(base, f"Patient?identifier={q}", token))
    if len(found) != 1:
        sys.exit(f"peer.py: {len(found)} Patients with Synthea identifier {ident} at {base}")
    print(found[0]["resource"]["id"])


SERVERS = [("ehrx-token", "ehrx, token"), ("ehrx-off", "ehrx, auth off"),
           ("helios", "Helios"), ("bare", "bare axum")]
SHAPES = [("read", "GET /Patient/{id}"), ("family", "Patient?family=X"),
          ("obs", "Observation?patient=P&code=C&_count=50"), ("ingest", "ingest (resources/s)")]
# (label, numerator, denominator, target)
RATIOS = [("read: ehrx-token / Helios", ("ehrx-token", "read"), ("helios", "read"), 2.0),
          ("family: ehrx-token / Helios", ("ehrx-token", "family"), ("helios", "family"), 2.0),
          ("obs: ehrx-token / Helios", ("ehrx-token", "obs"), ("helios", "obs"), 2.0),
          ("read: ehrx-token / bare axum", ("ehrx-token", "read"), ("bare", "read"), 0.25),
          ("read: ehrx-token / ehrx-off", ("ehrx-token", "read"), ("ehrx-off", "read"), 0.90),
          ("ingest: ehrx / Helios", ("ehrx-off", "ingest"), ("helios", "ingest"), 3.0)]


def table(results):
    runs, flagged = {}, set()
    with open(results) as f:
        for line in f:
            server, shape, _round, value, errors = line.split()
            runs.setdefault((server, shape), []).append(float(value))
            if errors != "0":
                flagged.add((server, shape))
    med = {k: statistics.median(v) for k, v in runs.items()}
    n = max((len(v) for v in runs.values()), default=0)
    cols = [s for s in SERVERS if any(k[0] == s[0] for k in med)]
    print(f"median of {n} interleaved rounds (req/s; ingest: resources/s)")
    head = "| request | " + " | ".join(c[1] for c in cols) + " |"
    print(head)
    print("|---" * (len(cols) + 1) + "|")
    for shape, label in SHAPES:
        if not any(k[1] == shape for k in med):
            continue
        cells = []
        for server, _ in cols:
            v = med.get((server, shape))
            cell = "" if v is None else f"{v:,.0f}"
            if (server, shape) in flagged:
                cell += " (errors!)"
            cells.append(cell)
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()
    print("| ratio | value | target |")
    print("|---|---|---|")
    for label, a, b, target in RATIOS:
        if a in med and b in med and med[b]:
            r = med[a] / med[b]
            print(f"| {label} | {r:.2f} | ≥ {target:g} ({'met' if r >= target else 'missed'}) |")
    if flagged:
        print("\n(errors!): some responses were not 2xx or wrk reported socket errors")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "helios-data":
        helios_data(*args)
    elif cmd == "pick":
        pick(*args)
    elif cmd == "id":
        patient_id(*args)
    elif cmd == "matches":
        print(len(matches(get(*args))))
    elif cmd == "table":
        table(*args)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
