#!/usr/bin/env python3
"""Generates profiles/r4-summary.json from the FHIR R4 (4.0.1) core
StructureDefinitions: for every resource type, the JSON names of its
top-level elements that are in the summary (`isSummary`) and those that are
mandatory (`min` > 0), for `_summary=true` and `_elements`.

Usage: scripts/gen-summary.py ../shared/data/definitions/structuredefinitions > profiles/r4-summary.json
"""
import glob, json, os, sys

src = sys.argv[1]
out = {}
for f in sorted(glob.glob(os.path.join(src, "StructureDefinition-*.json"))):
    sd = json.load(open(f))
    if sd.get("derivation") != "specialization" or sd.get("kind") != "resource":
        continue
    summary, mandatory = [], []
    for el in sd["snapshot"]["element"]:
        parts = el["path"].split(".")
        if len(parts) != 2:
            continue
        name = parts[1]
        names = [name]
        if name.endswith("[x]"):
            base = name[:-3]
            names = [base + t["code"][0].upper() + t["code"][1:] for t in el.get("type", [])]
        if el.get("isSummary"):
            summary += names
        if el.get("min", 0) > 0:
            mandatory += names
    out[sd["type"]] = {"summary": sorted(set(summary)), "mandatory": sorted(set(mandatory))}
json.dump(out, sys.stdout, separators=(",", ":"), sort_keys=True)
sys.stdout.write("\n")
