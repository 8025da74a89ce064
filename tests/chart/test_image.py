"""The container image, checked without a Docker engine: the Dockerfile's shape, its build context
(.dockerignore), and the wheel its build stage makes, rebuilt here the way the Dockerfile does."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.chart.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
NPM_WORKDIR = "/src/"  # where the novnc stage runs `npm ci`: stands for the repository root here


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions per stage; continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))
    stages: list[Stage] = []
    for line in joined.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            base, _, name = args.partition(" AS ")
            stages.append(Stage(name=name.strip() or f"stage{len(stages)}", base=base.strip()))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last pattern that matches the path or one of its parent
    folders decides; `!` re-includes; `**/` also matches at the top."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        negated = raw.startswith("!")
        pattern = raw.removeprefix("!").rstrip("/")
        forms = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(c, f) for c in candidates for f in forms):
            excluded = not negated
    return excluded


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return {stage.name: stage for stage in parse_dockerfile(DOCKERFILE.read_text())}


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerfile_has_three_stages_and_a_slim_final_one(stages: dict[str, Stage]) -> None:
    names = list(stages)
    assert names[:2] == ["novnc", "wheel"]
    assert len(names) == 3
    final = stages[names[-1]]
    assert re.fullmatch(r"\$\{PYTHON_IMAGE\}|python:3\.11-slim\S*", final.base)
    assert "python:3.11-slim" in DOCKERFILE.read_text()
    run = " ".join(final.all("RUN"))
    for tool in ("apt-get", "gcc", "build-essential", "npm", "curl", "wget"):
        assert tool not in run, f"the final stage must not install {tool}"
    assert final.all("USER") == ["10001:10001"], "numeric non-root user, last word on the user"
    assert final.all("CMD") == ['["vncgate-relay"]']
    assert "npm ci --omit=dev" in " ".join(stages["novnc"].all("RUN"))


def test_novnc_is_a_production_npm_dependency() -> None:
    """The image's `npm ci --omit=dev` must still install the noVNC client."""
    package = json.loads((ROOT / "package.json").read_text())
    assert "@novnc/novnc" in package["dependencies"]


def test_build_context_has_what_the_dockerfile_copies(
        stages: dict[str, Stage], ignore_patterns: list[str]) -> None:
    for stage in stages.values():
        for args in stage.all("COPY"):
            if args.startswith("--from="):
                continue
            *sources, _ = args.split()
            for source in sources:
                path = source.rstrip("/")
                assert (ROOT / path).exists(), f"COPY {source}: not in the repository"
                assert not dockerignore_excludes(path, ignore_patterns), (
                    f"COPY {source}: excluded by .dockerignore")


@pytest.mark.parametrize(("path", "excluded"), [
    ("relay/cli.py", False),
    ("operator/vncgate_operator/cli.py", False),
    ("common/spec.py", False),
    ("pyproject.toml", False),
    ("relay/static/novnc/viewer.js", False),
    ("relay/static/novnc/core/rfb.js", True),  # from npm in the image, never the working tree
    ("relay/__pycache__/cli.cpython-311.pyc", True),
    ("node_modules/@novnc/novnc/core/rfb.js", True),
    (".venv/bin/python", True),
    ("tests/conftest.py", True),
    (".git/HEAD", True),
    (".tools/helm/helm", True),
])
def test_dockerignore_keeps_the_context_small(
        ignore_patterns: list[str], path: str, excluded: bool) -> None:
    assert dockerignore_excludes(path, ignore_patterns) is excluded


def replay_wheel_stage(stage: Stage, ignore_patterns: list[str], context: Path) -> None:
    """Do the wheel stage's COPYs into `context`: from the repository (minus .dockerignore) and
    from the novnc stage (its /src/node_modules is the repository's, from the same lock file)."""
    workdir = Path(stage.all("WORKDIR")[-1])
    for args in stage.all("COPY"):
        from_stage = None
        if args.startswith("--from="):
            option, _, args = args.partition(" ")
            from_stage = option.removeprefix("--from=")
        *sources, dest = args.split()
        for source in sources:
            if from_stage is None:
                origin = ROOT / source.rstrip("/")
            else:
                assert from_stage == "novnc" and source.startswith(NPM_WORKDIR), args
                origin = ROOT / source.removeprefix(NPM_WORKDIR).rstrip("/")
            assert origin.exists(), f"COPY {source}: {origin} does not exist (run scripts/setup)"
            target = context / (Path(dest) if not dest.startswith("/") else
                                Path(dest).relative_to(workdir))
            if dest.endswith("/") and origin.is_file():
                target = target / origin.name
            if origin.is_dir():
                def ignore(folder: str, names: list[str], origin: Path = origin,
                           from_repo: bool = from_stage is None) -> list[str]:
                    if not from_repo:
                        return []
                    rel = Path(folder).relative_to(ROOT)
                    return [n for n in names
                            if dockerignore_excludes(str(rel / n), ignore_patterns)]
                shutil.copytree(origin, target, ignore=ignore, dirs_exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, target)


@pytest.fixture(scope="module")
def wheel(stages: dict[str, Stage], ignore_patterns: list[str],
          tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    context = tmp_path_factory.mktemp("wheel-stage")
    replay_wheel_stage(stages["wheel"], ignore_patterns, context / "src")
    outdir = context / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(outdir), str(context / "src")],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"python -m build failed:\n{result.stdout}\n{result.stderr}"
    (built,) = outdir.glob("vncgate-*.whl")
    return zipfile.ZipFile(built)


@pytest.mark.slow
def test_wheel_carries_novnc_and_the_viewer(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert "vncgate/relay/static/novnc/core/rfb.js" in names
    assert any(n.startswith("vncgate/relay/static/novnc/vendor/") for n in names)
    assert any(n.startswith("vncgate/relay/") and n.endswith("viewer.html") for n in names), (
        "the viewer page (vncgate/relay/templates/viewer.html)")


@pytest.mark.slow
def test_wheel_installs_only_under_vncgate(wheel: zipfile.ZipFile) -> None:
    """Nothing installs a top-level `relay` or `vncgate_operator` (generic names that shadow
    others); the three packages
    are `vncgate.relay`, `vncgate.operator` and `vncgate.common` (`vncgate` a namespace)."""
    names = set(wheel.namelist())
    for package in ("relay", "operator", "common", "kubectl"):
        assert f"vncgate/{package}/__init__.py" in names
        assert f"vncgate/{package}/py.typed" in names
    assert "vncgate/relay/cli.py" in names and "vncgate/operator/cli.py" in names
    assert "vncgate/__init__.py" not in names  # a namespace package: no folder claims it
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"vncgate"}, tops
    assert not any("__pycache__" in n for n in names)
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")] or [None]
    if top_level is not None:
        assert wheel.read(top_level).decode().split() == ["vncgate"]
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = wheel.read(entry_points).decode()
    assert "vncgate-relay = vncgate.relay.cli:main" in text
    assert "vncgate-operator = vncgate.operator.cli:main" in text
    # `pip install vncgate` puts the kubectl plugin on PATH.
    assert "kubectl-vnc = vncgate.kubectl.cli:main" in text


@pytest.mark.slow
def test_installed_wheel_imports_as_vncgate_relay(wheel: zipfile.ZipFile,
                                                  tmp_path: Path) -> None:
    """`python -c "import vncgate.relay"` works from the wheel, and `import relay` does not.
    Without site-packages (-S), so that the editable install cannot answer instead; the
    image test (tests/image) imports the command-line modules with their dependencies."""
    target = tmp_path / "site"
    wheel.extractall(target)
    code = ("import importlib.util, sys\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "import vncgate.relay, vncgate.operator, vncgate.common.spec\n"
            "for module in (vncgate.relay, vncgate.operator, vncgate.common.spec):\n"
            "    assert module.__file__.startswith(sys.argv[1]), module.__file__\n"
            "import vncgate.kubectl\n"
            "for top in ('relay', 'vncgate_operator', 'common', 'kubectl'):\n"
            "    assert importlib.util.find_spec(top) is None, top\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(target)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stderr
