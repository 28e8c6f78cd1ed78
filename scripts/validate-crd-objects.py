#!/usr/bin/env python3
"""Validates policy objects against the OpenAPI v3 schemas of the CRDs that define them.

  validate-crd-objects.py --crd CRD.yaml [--crd ...] OBJECTS.yaml [...]

Every document of OBJECTS must be a kind one of the CRDs serves (apiVersion group/version
and kind), and must match that version's openAPIV3Schema. Unknown fields are errors, as with
`kubectl apply --validate=strict` (the API server's strict field validation): every object
schema that lists properties is closed unless it says otherwise. Prints one line per object;
exits 1 when any fails.
"""
import argparse
import copy
import sys

import jsonschema
import yaml


def closed(schema):
    """The schema with additionalProperties: false wherever properties are listed."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    return s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--crd", action="append", required=True)
    ap.add_argument("objects", nargs="+")
    args = ap.parse_args()
    schemas = {}
    for path in args.crd:
        with open(path) as f:
            for crd in yaml.safe_load_all(f):
                if not crd or crd.get("kind") != "CustomResourceDefinition":
                    continue
                group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
                for v in crd["spec"]["versions"]:
                    schemas[(f"{group}/{v['name']}", kind)] = closed(v["schema"]["openAPIV3Schema"])
    failed = 0
    for path in args.objects:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for d in docs:
            key = (d.get("apiVersion"), d.get("kind"))
            name = f"{path}: {d.get('kind')} {d.get('metadata', {}).get('name')}"
            schema = schemas.get(key)
            if schema is None:
                print(f"FAIL {name}: no CRD serves {key[0]} {key[1]}")
                failed += 1
                continue
            errors = sorted(
                jsonschema.Draft7Validator(schema).iter_errors(d), key=lambda e: list(e.path)
            )
            if errors:
                failed += 1
                for e in errors:
                    field = ".".join(str(p) for p in e.path)
                    print(f"FAIL {name}: {field}: {e.message}")
            else:
                print(f"ok   {name}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
