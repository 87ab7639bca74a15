"""Loading the Terraform sources with python-hcl2 (no terraform binary needed) and reading IAM policy documents."""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import hcl2

ROOT = Path(__file__).resolve().parents[2]
TERRAFORM = ROOT / "terraform"
_OPTIONS = hcl2.SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)


def tf_files() -> list[Path]:
    return sorted(TERRAFORM.rglob("*.tf"))


def load(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return hcl2.load(f, serialization_options=_OPTIONS)


def load_dir(directory: Path) -> dict[str, list]:
    """All top-level blocks of a module directory, merged over its files."""
    merged: dict[str, list] = {}
    for path in sorted(directory.glob("*.tf")):
        for kind, items in load(path).items():
            merged.setdefault(kind, []).extend(items)
    return merged


def blocks(module: dict[str, list], kind: str, type_: str) -> dict[str, dict]:
    """``blocks(m, "resource", "aws_s3_bucket")`` → {name: body}."""
    out: dict[str, dict] = {}
    for item in module.get(kind, []):
        for t, named in item.items():
            if t == type_:
                out.update(named)
    return out


def variables(module: dict[str, list]) -> dict[str, dict]:
    return {name: body for item in module.get("variable", []) for name, body in item.items()}


def outputs(module: dict[str, list]) -> dict[str, dict]:
    return {name: body for item in module.get("output", []) for name, body in item.items()}


def substitute(text: str, values: dict[str, str]) -> str:
    """Replace ``${var.x}`` / ``${local.x}`` with the given values; any other interpolation is an error."""

    def one(m: re.Match) -> str:
        if m.group(1) not in values:
            raise KeyError(f"no value for ${{{m.group(1)}}} in {text!r}")
        return values[m.group(1)]

    return re.sub(r"\$\{((?:var|local)\.[a-z0-9_]+)\}", one, text)


@dataclass(frozen=True)
class Statement:
    effect: str
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    conditions: tuple[tuple[str, str, tuple[str, ...]], ...]  # (test, key, values)

    def allows(self, action: str, resource: str, context: dict[str, str]) -> bool:
        if self.effect != "Allow" or not any(fnmatch.fnmatchcase(action, a) for a in self.actions):
            return False
        if not any(_arn_match(resource, r) for r in self.resources):
            return False
        for test, key, values in self.conditions:
            if key not in context:  # IAM: a condition on an absent key does not match (no ...IfExists used here)
                return False
            if test == "StringLike" and not any(_arn_match(context[key], v) for v in values):
                return False
            if test == "StringEquals" and context[key] not in values:
                return False
            if test not in ("StringLike", "StringEquals"):
                raise ValueError(f"condition test {test} is not modelled")
        return True


def _arn_match(value: str, pattern: str) -> bool:
    """IAM wildcard match: ``*`` any run of characters, ``?`` one character (nothing else is special)."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value) is not None


def policy_statements(module: dict[str, list], name: str, values: dict[str, str]) -> list[Statement]:
    """The static statements of ``data "aws_iam_policy_document" "<name>"`` with interpolations filled in.
    Dynamic statements (optional KMS grants) are left out: see :func:`dynamic_statements`."""
    doc = blocks(module, "data", "aws_iam_policy_document")[name]
    out = []
    for st in doc.get("statement", []):
        conds = tuple((c["test"], substitute(c["variable"], values), tuple(substitute(v, values) for v in c["values"]))
                      for c in st.get("condition", []))
        out.append(Statement(st.get("effect", "Allow"), tuple(st["actions"]),
                             tuple(substitute(r, values) for r in st["resources"]), conds))
    return out


def dynamic_statements(module: dict[str, list], name: str) -> list[dict]:
    """``[{"for_each": ..., "actions": [...]}]`` for the dynamic statements of a policy document."""
    doc = blocks(module, "data", "aws_iam_policy_document")[name]
    out = []
    for dyn in doc.get("dynamic", []):
        body = dyn["statement"]
        for content in body["content"]:
            out.append({"for_each": body["for_each"], "actions": list(content["actions"])})
    return out


def gcs_condition(name: str, bucket: str, prefix: str):
    """The IAM condition of gcp-access as a Python predicate over (resource type, resource name, list prefix).

    The CEL subset used there (==, &&, ||, startsWith, api.getAttribute) maps 1:1 onto Python."""
    m = load_dir(TERRAFORM / "modules" / "gcp-access")
    local = {k: v for item in m["locals"] for k, v in item.items()}[name]
    parts = re.fullmatch(r'\$\{join\(" \|\| ", \[(.*)\]\)\}', local, re.S).group(1)
    clauses = [json.loads(s) for s in re.findall(r'"(?:[^"\\]|\\.)*"', parts)]
    values = {"var.bucket_name": bucket, "var.run_prefix": prefix, "local.restore_prefix": prefix,
              "local.object_root": f"projects/_/buckets/{bucket}/objects/"}
    expr = " || ".join(substitute(c, values) for c in clauses)
    py = expr.replace("&&", " and ").replace("||", " or ").replace(".startsWith(", ".startswith(")

    def admits(rtype: str, rname: str, list_prefix: str | None = None) -> bool:
        api = SimpleNamespace(getAttribute=lambda key, default: list_prefix if list_prefix is not None and
                              key == "storage.googleapis.com/objectListPrefix" else default)
        return bool(eval(py, {"__builtins__": {}}, {"resource": SimpleNamespace(type=rtype, name=rname), "api": api}))

    return admits
