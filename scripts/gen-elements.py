#!/usr/bin/env python3
"""Generates profiles/r4-elements.json from the FHIR R4 (4.0.1) core
StructureDefinitions: for every resource and complex datatype, each element's
JSON name → its type (a primitive or complex type name, "Resource" for
contained resources, or an inline object for backbone elements).

Usage: scripts/gen-elements.py ../shared/data/definitions/structuredefinitions > profiles/r4-elements.json
"""
import glob, json, os, sys

src = sys.argv[1]
out = {}
for f in sorted(glob.glob(os.path.join(src, "StructureDefinition-*.json"))):
    sd = json.load(open(f))
    if sd.get("derivation") != "specialization" or sd.get("kind") not in ("resource", "complex-type"):
        continue
    root = {}
    for el in sd["snapshot"]["element"]:
        path = el["path"]
        parts = path.split(".")
        if len(parts) == 1:
            continue
        # Find the container for this element.
        node = root
        ok = True
        for p in parts[1:-1]:
            p = p.replace("[x]", "")
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                ok = False
                break
            node = nxt
        if not ok:
            continue
        name = parts[-1]
        if "contentReference" in el:
            # e.g. Questionnaire.item.item -> #Questionnaire.item
            node[name] = {"$ref": el["contentReference"].lstrip("#")}
            continue
        types = [t["code"] for t in el.get("type", [])]
        if not types:
            continue
        if name.endswith("[x]"):
            base = name[:-3]
            for t in types:
                node[base + t[0].upper() + t[1:]] = t
        elif types[0] in ("BackboneElement", "Element") and len(parts) > 1 and sd["type"] not in ("Element", "BackboneElement") and any(
            e["path"].startswith(path + ".") for e in sd["snapshot"]["element"]
        ):
            node[name] = {}
        else:
            t = types[0]
            if t.startswith("http://hl7.org/fhirpath/System."):
                t = "System." + t.rsplit(".", 1)[1]
            node[name] = t
    out[sd["type"]] = root
json.dump(out, sys.stdout, separators=(",", ":"), sort_keys=True)
