#!/usr/bin/env python3
"""Writes conformance/search-parameters.json: the R4 core SearchParameters
trimmed to what ehrx indexes and advertises (code, url, type, base, the
FHIRPath expression, reference targets and composite components).

    python3 scripts/gen-search-params.py ../shared/data/definitions/search-parameters.json
"""
import json, sys, os

src = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/definitions/search-parameters.json"
bundle = json.load(open(src))
params = [e["resource"] for e in bundle["entry"]]
by_url = {p["url"]: p for p in params}
# Consent.provision nests: the circle of trust finds the Consents that name
# a caller at any of the three provision levels ehrx accepts, so `actor`
# (and `Consent?actor=`) covers nested provisions too.
NESTED = " | ".join("Consent" + ".provision" * n + ".actor.reference" for n in (1, 2, 3))
OVERRIDES = {"http://hl7.org/fhir/SearchParameter/Consent-actor": NESTED}
out = []
for p in params:
    item = {
        "code": p["code"],
        "url": p["url"],
        "type": p["type"],
        "base": p["base"],
        "expression": OVERRIDES.get(p["url"], p.get("expression", "")),
    }
    if p.get("target"):
        item["target"] = p["target"]
    if p.get("component"):
        item["component"] = [
            {"code": by_url[c["definition"]]["code"], "type": by_url[c["definition"]]["type"],
             "expression": c["expression"]}
            for c in p["component"]
        ]
    out.append(item)
out.sort(key=lambda i: (i["base"][0], i["code"]))
dest = os.path.join(os.path.dirname(__file__), "..", "conformance", "search-parameters.json")
with open(dest, "w") as f:
    f.write("[\n" + ",\n".join(json.dumps(i, ensure_ascii=False) for i in out) + "\n]\n")
print(f"{len(out)} search parameters written to {os.path.normpath(dest)}")

# Compartments: for each compartment type, the parameters of each resource
# type that place a resource in it (CompartmentDefinition.resource.param).
import glob
comp_dir = os.path.join(os.path.dirname(src), "compartmentdefinitions")
compartments = {}
for f in sorted(glob.glob(os.path.join(comp_dir, "CompartmentDefinition-*.json"))):
    d = json.load(open(f))
    if d.get("id") == "example":
        continue
    compartments[d["code"]] = {r["code"]: r["param"] for r in d["resource"] if r.get("param")}
dest = os.path.join(os.path.dirname(__file__), "..", "conformance", "compartments.json")
with open(dest, "w") as f:
    json.dump(compartments, f, indent=1, sort_keys=True)
    f.write("\n")
print(f"{len(compartments)} compartments written to {os.path.normpath(dest)}")
