"""Validates Kubernetes manifests offline; run by scripts/check-deploy.sh.

    python validate_manifests.py --kubernetes-version 1.30.0 DIR_OR_FILE... [-]

Every YAML document of every file (a directory: its *.yaml files; "-": a
stream on stdin, such as `kubectl kustomize` output) must validate:

- Built-in kinds (Deployment, NetworkPolicy, ...) against the JSON schemas of
  that Kubernetes version's OpenAPI that the PyPI package kubernetes-validate
  ships (no network), in its strict form: an unknown field is an error, as it
  is for `kubectl apply` (server-side field validation, Kubernetes 1.27+).
- Custom resources (KEDA's ScaledObject, the Prometheus Operator's
  PrometheusRule, ...) against the openAPIV3Schema of the
  CustomResourceDefinitions vendored beside this file, made strict the same
  way (objects that list their properties get additionalProperties: false
  unless marked x-kubernetes-preserve-unknown-fields), with metadata checked
  as the built-in ObjectMeta. The CRDs' CEL rules (x-kubernetes-validations)
  are not evaluated.
- A Kustomization: every resource it lists exists, and every manifest in its
  directory is listed (secret.example.yaml is the one deliberate exception).

A kind without a schema is an error, not a warning. Exits 1 on any error.
"""

import argparse
import copy
import glob
import importlib.resources
import json
import os
import sys

import jsonschema
import referencing
import referencing.jsonschema
import yaml
from kubernetes_validate import utils as kv

HERE = os.path.dirname(os.path.abspath(__file__))
DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"
OBJECT_META = DEFINITIONS_ID + "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
# Files in a kustomization's directory that it must not list.
NOT_LISTED = {"kustomization.yaml", "secret.example.yaml"}


def strict(schema):
    """A CRD schema as kubeconform's openapi2jsonschema --strict makes it."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def load_crds():
    """(apiVersion, kind) -> JSON schema, from the vendored CRDs."""
    schemas = {}
    for path in sorted(glob.glob(os.path.join(HERE, "*.yaml"))):
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if not doc or doc.get("kind") != "CustomResourceDefinition":
                    continue
                group = doc["spec"]["group"]
                kind = doc["spec"]["names"]["kind"]
                for version in doc["spec"]["versions"]:
                    schema = strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
                    schema["properties"]["metadata"] = {"$ref": OBJECT_META}
                    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
                    schemas[(f"{group}/{version['name']}", kind)] = (schema, os.path.basename(path))
    return schemas


def definitions(version):
    """The built-in definitions (ObjectMeta and the rest) of that version."""
    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    major_minor = ".".join(version.split(".")[:2])
    candidates = sorted(
        (p.name for p in root.iterdir() if p.name.endswith("-local-strict")),
        key=lambda name: [int(x) for x in name[1:].split("-")[0].split(".")],
    )
    chosen = [c for c in candidates if ".".join(c[1:].split(".")[:2]) == major_minor]
    if not chosen:
        sys.exit(f"kubernetes-validate ships no schemas for Kubernetes {version}")
    return json.loads((root / chosen[-1] / "_definitions.json").read_text())


def documents(target):
    if target == "-":
        yield "<stdin>", sys.stdin.read()
        return
    paths = sorted(glob.glob(os.path.join(target, "*.yaml"))) if os.path.isdir(target) else [target]
    for path in paths:
        with open(path) as f:
            yield path, f.read()


def check_kustomization(path, doc):
    directory = os.path.dirname(path)
    errors = []
    listed = set()
    for resource in doc.get("resources", []):
        full = os.path.normpath(os.path.join(directory, resource))
        if os.path.isdir(full):
            if not os.path.exists(os.path.join(full, "kustomization.yaml")):
                errors.append(f"resource {resource} is a directory without kustomization.yaml")
        elif not os.path.exists(full):
            errors.append(f"resource {resource} does not exist")
        listed.add(os.path.basename(full))
    for manifest in sorted(glob.glob(os.path.join(directory, "*.yaml"))):
        name = os.path.basename(manifest)
        if name not in NOT_LISTED and name not in listed:
            errors.append(f"{name} is in the directory but not listed under resources")
    return errors


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubernetes-version", required=True)
    parser.add_argument("targets", nargs="+")
    args = parser.parse_args()

    crds = load_crds()
    registry = referencing.Resource.from_contents(definitions(args.kubernetes_version)) @ referencing.Registry()
    failures = 0
    checked = 0
    for path, text in ((p, t) for target in args.targets for p, t in documents(target)):
        try:
            docs = [d for d in yaml.safe_load_all(text) if d]
        except yaml.YAMLError as error:
            print(f"ERROR {path}: not YAML: {error}")
            failures += 1
            continue
        for doc in docs:
            checked += 1
            if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
                print(f"ERROR {path}: a document without apiVersion and kind")
                failures += 1
                continue
            name = f"{doc['kind']}/{(doc.get('metadata') or {}).get('name', '?')}"
            if doc["kind"] == "Kustomization":
                problems = check_kustomization(path, doc) if path != "<stdin>" else []
                for problem in problems:
                    print(f"ERROR {path}: Kustomization: {problem}")
                failures += len(problems)
                if not problems:
                    print(f"ok    {path}: Kustomization (every resource exists, every manifest is listed)")
                continue
            key = (doc["apiVersion"], doc["kind"])
            if key in crds:
                schema, source = crds[key]
                validator = jsonschema.Draft202012Validator(schema, registry=registry)
                errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
                for error in errors:
                    where = ".".join(str(p) for p in error.absolute_path) or "(top)"
                    print(f"ERROR {path}: {name}: {where}: {error.message}")
                failures += bool(errors)
                if not errors:
                    print(f"ok    {path}: {name} (CRD schema {source}, strict)")
                continue
            try:
                version = kv.validate(doc, args.kubernetes_version, strict=True)
                print(f"ok    {path}: {name} (Kubernetes {version} schema, strict)")
            except kv.SchemaNotFoundError as error:
                print(f"ERROR {path}: {name}: no schema: {error.message}, and no vendored CRD for it")
                failures += 1
            except kv.ValidationError as error:
                where = ".".join(str(p) for p in error.path) or "(top)"
                print(f"ERROR {path}: {name}: {where}: {error.message}")
                failures += 1
    if checked == 0:
        print("ERROR: no manifests found")
        return 1
    print(f"{checked - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
