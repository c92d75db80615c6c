#!/usr/bin/env python3
"""Generates profiles/r4-strict.json from the FHIR R4 (4.0.1) core
StructureDefinitions and terminology: what strict parsing needs beyond the
element types of profiles/r4-elements.json.

  {"elements": {"Type.path": {"name": spec, ...}, ...},
   "valueSets": {name: [code, ...], ...}}

`Type.path` is a resource, a complex datatype or a backbone element in one
(`Patient`, `Patient.contact`, `HumanName`), `name` one of its elements as
named in JSON (choice elements expanded: `valueQuantity`) — the nesting of
profiles/r4-elements.json, flattened. `spec` is "*" when the
element repeats (a JSON array), followed by the name of a value set when the
element is a `code` with a *required* binding ("*" alone, "=name" or
"*=name"). Elements that neither repeat nor have a required code binding are
left out, to keep the table small.

Value sets are expanded from the package's ValueSets and CodeSystems:
`compose.include` by `concept` list, by whole (complete) CodeSystem, and by
imported `valueSet`s, minus `compose.exclude`; abstract (notSelectable)
concepts are not codes an instance may carry. A value set that cannot be
expanded from the files (a filter, an external or incomplete code system, a
missing ValueSet) is left out, and its elements go unchecked: they are listed
on stderr.

Usage: scripts/gen-strict.py ../shared/data/definitions > profiles/r4-strict.json
"""
import glob, json, os, sys

defs = sys.argv[1]


def load_all(pattern):
    out = {}
    for f in sorted(glob.glob(os.path.join(defs, pattern))):
        r = json.load(open(f))
        out[r["url"]] = r
    return out


valuesets = load_all("terminology/valuesets/ValueSet-*.json")
codesystems = load_all("terminology/codesystems/CodeSystem-*.json")


class Unexpandable(Exception):
    pass


def flatten(concepts):
    for c in concepts:
        abstract = any(
            p.get("code") == "notSelectable" and p.get("valueBoolean") is True
            for p in c.get("property", [])
        )
        if not abstract:
            yield c["code"]
        yield from flatten(c.get("concept", []))


def system_codes(url):
    cs = codesystems.get(url)
    if cs is None:
        raise Unexpandable(f"code system {url} is not defined in the package")
    if cs.get("content") != "complete":
        raise Unexpandable(f"code system {url} has content '{cs.get('content')}'")
    return set(flatten(cs.get("concept", [])))


def part(inc, seen):
    if "filter" in inc:
        raise Unexpandable(f"filter on {inc.get('system')}")
    codes = None
    if "system" in inc:
        if "concept" in inc:
            codes = {c["code"] for c in inc["concept"]}
        else:
            codes = system_codes(inc["system"])
    for vs in inc.get("valueSet", []):
        sub = expand(vs, seen)
        codes = sub if codes is None else codes & sub
    return codes or set()


def expand(url, seen=()):
    url = url.split("|")[0]
    if url in seen:
        raise Unexpandable(f"value set {url} imports itself")
    vs = valuesets.get(url)
    if vs is None:
        raise Unexpandable(f"value set {url} is not in the package")
    compose = vs.get("compose", {})
    codes = set()
    for inc in compose.get("include", []):
        codes |= part(inc, seen + (url,))
    for exc in compose.get("exclude", []):
        codes -= part(exc, seen + (url,))
    if not codes:
        raise Unexpandable(f"value set {url} expands to nothing")
    return codes


elements = {}
bound = {}  # value set url -> codes
skipped = {}  # value set url -> (reason, [element paths])

for f in sorted(glob.glob(os.path.join(defs, "structuredefinitions", "StructureDefinition-*.json"))):
    sd = json.load(open(f))
    if sd.get("derivation") != "specialization" or sd.get("kind") not in ("resource", "complex-type"):
        continue
    for el in sd["snapshot"]["element"]:
        parts = el["path"].split(".")
        if len(parts) == 1:
            continue
        parents = [p.replace("[x]", "") for p in parts[1:-1]]
        name = parts[-1]
        types = [t["code"] for t in el.get("type", [])]
        names = [name[:-3] + t[0].upper() + t[1:] for t in types] if name.endswith("[x]") else [name]
        # The JSON shape follows the base definition's cardinality.
        many = el.get("base", {}).get("max", el.get("max")) != "1"
        vs = None
        binding = el.get("binding", {})
        if types == ["code"] and binding.get("strength") == "required" and "valueSet" in binding:
            url = binding["valueSet"].split("|")[0]
            try:
                bound.setdefault(url, sorted(expand(url)))
                vs = url
            except Unexpandable as e:
                skipped.setdefault(url, (str(e), []))[1].append(el["path"])
        if not many and vs is None:
            continue
        spec = ("*" if many else "") + (f"={vs.rsplit('/', 1)[-1]}" if vs else "")
        for n in names:
            elements.setdefault(".".join([sd["type"]] + parents), {})[n] = spec

# The objects beside primitives (`_given`) are Elements; Element has no
# StructureDefinition in the package.
elements["Element"] = {"extension": "*"}

short = {url.rsplit("/", 1)[-1]: codes for url, codes in bound.items()}
assert len(short) == len(bound), "value set names are not unique"

for url, (reason, paths) in sorted(skipped.items()):
    print(f"unchecked: {url}: {reason}: {', '.join(paths)}", file=sys.stderr)
print(
    f"{sum(map(len, elements.values()))} elements, {len(short)} value sets expanded, {len(skipped)} skipped",
    file=sys.stderr,
)
json.dump(
    {"elements": elements, "valueSets": short},
    sys.stdout,
    separators=(",", ":"),
    sort_keys=True,
)
