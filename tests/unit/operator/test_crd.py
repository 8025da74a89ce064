"""The CRD teaches `kubectl explain`, and the examples are valid against it and the parser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from vncgate.common.spec import API_GROUP, API_VERSION, KIND, PLURAL, parse_spec

ROOT = Path(__file__).resolve().parents[3]
CRD = yaml.safe_load((ROOT / "crds" / "vnctargets.vncgate.io.yaml").read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path or "(root)", schema)]
    for name, sub in (schema.get("properties") or {}).items():
        found += walk(sub, f"{path}.{name}")
    if "items" in schema:
        found += walk(schema["items"], f"{path}[]")
    return found


def as_json_schema(schema: Any) -> Any:
    """OpenAPI v3 (structural) to JSON Schema: int-or-string, no unknown fields."""
    if isinstance(schema, list):
        return [as_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: as_json_schema(v) for k, v in schema.items() if not k.startswith("x-kubernetes")}
    if schema.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if out.get("type") == "object" and "properties" in out and schema is not SCHEMA \
            and schema is not SCHEMA["properties"]["metadata"]:
        out["additionalProperties"] = False  # the API server prunes unknown fields
    return out


def test_names() -> None:
    assert CRD["metadata"]["name"] == f"{PLURAL}.{API_GROUP}"
    names = CRD["spec"]["names"]
    assert (names["kind"], names["plural"], names["singular"]) == (KIND, PLURAL, "vnctarget")
    assert names["shortNames"] == ["vnc"] and names["categories"] == ["vncgate"]
    assert CRD["spec"]["scope"] == "Namespaced"
    assert VERSION["name"] == API_VERSION and VERSION["subresources"] == {"status": {}}
    assert [c["name"] for c in VERSION["additionalPrinterColumns"]] == [
        "Endpoint", "Phase", "Sessions", "Viewers", "URL", "Age"]


def test_every_field_is_described() -> None:
    # metadata is the exception: the API server refuses anything in it but name/generateName.
    missing = [path for path, sub in walk(SCHEMA)
               if not sub.get("description") and not path.startswith(".metadata")]
    assert not missing, f"fields without a description (kubectl explain shows nothing): {missing}"


def test_status_is_closed() -> None:
    # kopf keeps its state in annotations, so status needs no preserve-unknown-fields.
    assert not any(sub.get("x-kubernetes-preserve-unknown-fields") for _, sub in walk(SCHEMA))


def test_exactly_one_endpoint_rule() -> None:
    endpoint = SCHEMA["properties"]["spec"]["properties"]["endpoint"]
    assert endpoint["x-kubernetes-validations"][0]["rule"] == \
        "[has(self.service), has(self.address), has(self.kubevirt)].filter(x, x).size() == 1"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        assert (doc["apiVersion"], doc["kind"]) == (f"{API_GROUP}/{API_VERSION}", KIND)
        jsonschema.validate(doc, as_json_schema(SCHEMA))
        parse_spec(doc["spec"])


@pytest.mark.parametrize("spec", [
    {"endpoint": {"address": {"host": "h", "port": 0}}},
    {"endpoint": {"address": {"host": "h", "port": 70000}}},
    {"endpoint": {"address": {"host": "no spaces", "port": 5900}}},
    {"endpoint": {"address": {"host": "h"}}},
    {"endpoint": {"service": {"name": "Upper", "port": 5900}}},
    {"endpoint": {"address": {"host": "h", "port": 1}}, "displayName": "x" * 257},
    {"endpoint": {"address": {"host": "h", "port": 1}}, "unknown": 1},
])
def test_schema_rejects(spec: dict[str, Any]) -> None:
    doc = {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND,
           "metadata": {"name": "x"}, "spec": spec}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, as_json_schema(SCHEMA))
