"""Every value is documented: in the chart README's values table and in values.schema.json, and
the two agree (keys, types, defaults, descriptions) with values.yaml."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.chart.conftest import CHART, ROOT, load_script

ROW = re.compile(r"^\| `(?P<key>[^`]+)` \| (?P<type>\w+) \| `(?P<default>.*)` \| "
                 r"(?P<description>.*) \|$")


def uncell(text: str) -> str:
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("\\|", "|")


def readme_rows() -> list[dict[str, str]]:
    text = (CHART / "README.md").read_text()
    return [{k: uncell(v) for k, v in m.groupdict().items()}
            for line in text.splitlines() if (m := ROW.match(line))]


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref", "")
    if ref.startswith("#/definitions/"):
        return resolve(schema, schema["definitions"][ref.removeprefix("#/definitions/")])
    return node


def schema_leaves(schema: dict[str, Any], node: dict[str, Any],
                  prefix: str = "") -> Iterator[str]:
    """Dotted paths of the schema's properties that have no properties of their own."""
    for name, child in resolve(schema, node).get("properties", {}).items():
        path = f"{prefix}{name}"
        if resolve(schema, child).get("properties"):
            yield from schema_leaves(schema, child, path + ".")
        else:
            yield path


def values_leaves(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for name, value in values.items():
        if isinstance(value, dict) and value:
            yield from values_leaves(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def covered(path: str, keys: set[str]) -> bool:
    parts = path.split(".")
    return any(".".join(parts[:i]) in keys for i in range(1, len(parts) + 1))


def test_table_and_schema_descriptions_are_what_values_yaml_says() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "chart-docs"), "--check"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_the_readme_table_and_the_schema_agree() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    rows = readme_rows()
    keys = [row["key"] for row in rows]
    assert len(rows) > 100 and len(keys) == len(set(keys)), "one row per value"
    docs = load_script("chart-docs")
    problems = []
    for row in rows:
        node = docs.schema_node(schema, row["key"])
        if node is None:
            problems.append(f"{row['key']}: in the README, not in values.schema.json")
            continue
        if node.get("description") != row["description"]:
            problems.append(f"{row['key']}: the schema's description differs from the README's")
        allowed = resolve(schema, node).get("type")
        if allowed is not None and row["type"] not in (
                allowed if isinstance(allowed, list) else [allowed]) and not (
                row["type"] == "integer" and "number" in str(allowed)):
            problems.append(f"{row['key']}: {row['type']} in the README, {allowed} in the schema")
        if json.loads(row["default"]) != docs.value_at(values, row["key"]):
            problems.append(f"{row['key']}: the README's default is not values.yaml's")
    key_set = set(keys)
    problems += [f"{path}: in values.schema.json, in no README row"
                 for path in schema_leaves(schema, schema) if not covered(path, key_set)]
    problems += [f"{path}: in values.yaml, in no README row (document it with `# --`)"
                 for path in values_leaves(values) if not covered(path, key_set)]
    assert not problems, "\n".join(problems)


def test_comments_document_the_key_below_them() -> None:
    docs = load_script("chart-docs")
    text = """\
# A section comment documents nothing.
relay:
  # -- Relay pods,
  # one or more.
  replicas: 1
  # A plain comment.
  undocumented: 2
  nested:
    # -- Deep.
    leaf: x
# -- Top.
top: {}
"""
    assert docs.documented(text) == [("relay.replicas", "Relay pods, one or more."),
                                     ("relay.nested.leaf", "Deep."), ("top", "Top.")]


@pytest.mark.parametrize("key", ["crds.enabled", "crds.keep", "global.imageRegistry",
                                 "image.registry", "relay.metrics.port", "relay.startupProbe",
                                 "relay.livenessProbe", "relay.readinessProbe",
                                 "operator.livenessProbe", "ingress.extraHosts",
                                 "ingress.tls.extra", "networkPolicy.relayEgress.enabled",
                                 "extraObjects"])
def test_the_new_values_are_in_the_table(key: str) -> None:
    assert key in {row["key"] for row in readme_rows()}
