"""The vncgate-kubectl distribution (packaging/kubectl) ships the modules of vncgate.common that
the plugin imports, all of them and no others, as the import graph shows them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

from tests.conftest import ROOT

CONFIG = ROOT / "packaging" / "kubectl" / "pyproject.toml"

# Run apart, on the link tree of scripts/setup, as lint-imports reads the code (scripts/test).
IMPORTED = """
import json, grimp
graph = grimp.build_graph("vncgate", cache_dir=None)
plugin = [module for module in graph.modules if module.startswith("vncgate.kubectl")]
print(json.dumps(sorted(set().union(*(graph.find_upstream_modules(m) for m in plugin)))))
"""


def test_the_plugin_distribution_ships_the_shared_modules_it_imports() -> None:
    listed = set(tomllib.loads(CONFIG.read_text())["tool"]["vncgate-release"]["common-modules"])
    result = subprocess.run([sys.executable, "-c", IMPORTED], capture_output=True, text=True,
                            timeout=120, check=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT / ".tools/typecheck")})
    needed = json.loads(result.stdout)
    common = {module.removeprefix("vncgate.common").lstrip(".") or "__init__"
              for module in needed if module.split(".")[:2] == ["vncgate", "common"]}
    assert common, "the import graph shows no vncgate.common module under the plugin"
    common.add("__init__")  # a package's __init__ is imported with any of its modules
    assert common <= listed, f"add to common-modules in {CONFIG}: {sorted(common - listed)}"
    assert listed <= common, f"not imported by the plugin; drop from {CONFIG}: " \
                             f"{sorted(listed - common)}"
    assert all((ROOT / "common" / f"{name}.py").exists() for name in listed)
