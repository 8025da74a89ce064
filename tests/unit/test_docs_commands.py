"""Every command in a ```sh block of README.md and docs/*.md is run by a test, or checked by a
named test; a new command that is neither fails here with what to do.

- Run as written: the sections of docs/KUBERNETES.md that tests/cluster/test_docs_journey.py runs
  block by block (and the same commands wherever another document repeats them).
- Command lines of `vncgate-relay` and `vncgate-operator`: parsed here by the commands' own
  parsers, with the files they name made up, so a flag or value that does not exist fails.
- Benchmark lines: every flag they use is in the benchmark's own --help.
- The rest: CHECKED, each with the test that checks it, a string that test's code must contain
  (so the entry fails when the test goes), and why it is not run as written.
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.docs import shell_blocks
from vncgate.kubectl.cli import build_parser as kubectl_vnc_parser
from vncgate.operator.settings import parse_args as operator_args
from vncgate.relay.settings import settings_from_args

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
KUBERNETES = ROOT / "docs" / "KUBERNETES.md"
JOURNEY = ROOT / "tests" / "cluster" / "test_docs_journey.py"
RUN_SECTIONS = ("Install", "A first console", "Upgrade", "Uninstall")

# command prefix -> (test "path::function", a string the test's code contains, why not run here)
CHECKED: dict[str, tuple[str, str, str]] = {
    "scripts/demo": ("tests/e2e/test_demo.py::test_demo_prints_a_url_that_shows_the_desktop",
                     "scripts/demo", "runs the demo and opens its URL in chromium"),
    "scripts/test": ("tests/unit/test_docs_commands.py::test_scripts_test_runs_every_check",
                     "scripts/test", "it runs the tests: its content is checked"),
    "scripts/release ": ("tests/cluster/test_release.py::dist", "RELEASE_SCRIPT",
                         "builds every artifact of a release (with a test version, in a test)"),
    "vncgate-relay hash-password": ("tests/relay/test_auth.py::test_hash_password_command",
                                    '"hash-password"', "prompts for a password"),
    "cat > users.yaml": ("tests/relay/test_auth.py::test_users_file_problems_are_named",
                         "users", "an example of the file's format with elided hashes"),
    "helm install vncgate charts/vncgate --namespace vncgate --create-namespace --set "
    "ingress.host=vnc.example.com --set image.repository=registry.example.com/vncgate": (
        "tests/cluster/test_docs_journey.py::test_install_first_console_upgrade_uninstall",
        '"Install"', "README's copy of the Install block, which the journey runs"),
    "kubectl apply -f examples/desk-service.yaml": (
        "tests/unit/operator/test_crd.py::test_examples", "jsonschema.validate",
        "needs a cluster with the Service; the example is validated against the CRD"),
    "kubectl get vnc -n lab": (
        "tests/cluster/test_docs_journey.py::test_install_first_console_upgrade_uninstall",
        '"A first console"', "the same command ends the first-console block the journey runs"),
    "kubectl describe vnc desk-1 -n lab": (
        "tests/cluster/test_operator.py::test_invalid_targets_say_what_to_fix", "message",
        "the conditions it prints are checked on the real API server"),
    "docker build": ("tests/image/test_image.py::test_the_relay_is_the_installed_wheel", "image",
                     "no Docker engine here: scripts/build-image builds the same Dockerfile"),
    "docker push": ("tests/image/test_image.py::test_the_relay_is_the_installed_wheel", "image",
                    "no registry is reachable from the tests"),
    "docker run": ("tests/image/test_image.py::test_documented_line_starts_and_serves",
                   "run.command", "the documented lines run with buildah instead of docker"),
    "buildah from": ("tests/image/test_image.py::test_documented_line_starts_and_serves",
                     "image", "tests/image runs the image with buildah the same way"),
    "buildah run": ("tests/image/test_image.py::test_documented_line_starts_and_serves",
                    "image", "tests/image runs the image with buildah the same way"),
    "buildah rm": ("tests/image/test_image.py::test_documented_line_starts_and_serves",
                   "image", "tests/image removes its working containers the same way"),
    "kubectl -n vncgate exec deploy/vncgate-relay -- vncgate-relay link": (
        "tests/relay/test_auth.py::test_link_command_prints_a_link_that_verifies", '"link"',
        "needs a running pod; the link command itself runs in the test"),
    "kubectl create rolebinding lab-editors": (
        "tests/cluster/test_kubectl_vnc.py::fleet", '"rolebinding"',
        "the plugin's tests bind the chart's roles (and edit/admin) the same way"),
    "kubectl create role mint-own-token": (
        "tests/cluster/test_kubectl_vnc.py::fleet", '"--resource=serviceaccounts/token"',
        "the plugin's tests grant each account the right to mint its own tokens the same way"),
    "kubectl create rolebinding ci-mint-own-token": (
        "tests/cluster/test_kubectl_vnc.py::fleet", '--role=mint-',
        "the plugin's tests bind that Role to each account the same way"),
    "vncviewer 127.0.0.1::": (
        "tests/cluster/test_kubectl_vnc.py::test_tigervnc_vncviewer_under_xvfb_through_the_proxy",
        '"vncviewer"', "a desktop program: the test runs it under Xvfb through kubectl vnc proxy"),
}
# Longest prefix first: `-m bench` would also match `-m bench.soak`.
BENCH = {".venv/bin/python -m bench.operator": "bench.operator",
         ".venv/bin/python -m bench.scale": "bench.scale",
         ".venv/bin/python -m bench.recording_encodings": "bench.recording_encodings",
         ".venv/bin/python -m bench.security_setup": "bench.security_setup",
         ".venv/bin/python -m bench.replicas_setup": "bench.replicas_setup",
         ".venv/bin/python -m bench.soak": "bench.soak",
         ".venv/bin/python -m bench.maskscan": "bench.maskscan",
         ".venv/bin/python -m bench.listpage": "bench.listpage",
         ".venv/bin/python -m bench.interleaved": "bench.interleaved",
         ".venv/bin/python -m bench.connload": "bench.connload",
         ".venv/bin/python -m bench": "bench"}


def commands(block: str) -> list[str]:
    """The commands of a block: continuation lines joined, comments and heredoc bodies dropped."""
    out: list[str] = []
    lines = iter(block.splitlines())
    pending = ""
    for raw in lines:
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        if not line or line.startswith("#"):
            continue
        heredoc = re.search(r"<<-?'?(\w+)'?", line)
        if heredoc:
            for body in lines:
                if body.strip() == heredoc.group(1):
                    break
        out.append(re.sub(r"\s+#.*$", "", line) if "'" not in line else line)
    return out


def every_command() -> list[tuple[str, str, str]]:
    """(document, section, command) for every command of every ```sh block."""
    found = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in re.finditer(r"^```sh\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
            headings = re.findall(r"^## (.*)$", text[:match.start()], re.MULTILINE)
            section = headings[-1] if headings else ""
            found += [(document.name, section, c) for c in commands(match.group(1))]
    return found


def run_commands() -> set[str]:
    return {c for heading in RUN_SECTIONS for b in shell_blocks(KUBERNETES, heading)
            for c in commands(b)}


def test_the_journey_runs_its_sections() -> None:
    source = JOURNEY.read_text()
    for heading in RUN_SECTIONS:
        assert re.search(rf'run_block\(plane, home, "{re.escape(heading)}"', source), \
            f"{JOURNEY.name} no longer runs '## {heading}' of KUBERNETES.md"


def function_source(node_id: str) -> str:
    path, name = node_id.split("::")
    tree = ast.parse((ROOT / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return ast.get_source_segment((ROOT / path).read_text(), node) or ""
    raise AssertionError(f"{node_id} does not exist")


@pytest.mark.parametrize("prefix", sorted(CHECKED))
def test_each_checking_test_exists(prefix: str) -> None:
    node_id, needle, reason = CHECKED[prefix]
    assert reason
    assert needle in function_source(node_id), f"{node_id} no longer contains {needle!r}"


def own_command_line(command: str) -> list[str] | None:
    words = shlex.split(command, comments=True)
    if words and words[0] in ("vncgate-relay", "vncgate-operator") and (
            len(words) == 1 or words[1] not in ("hash-password", "link")):
        return words
    return None


def kubectl_vnc_line(command: str) -> list[str] | None:
    """The plugin's arguments of a documented `kubectl vnc ...` line (a trailing & dropped)."""
    words = shlex.split(command.removesuffix("&"), comments=True)
    return words[2:] if words[:2] == ["kubectl", "vnc"] else None


def bench_module(command: str) -> str | None:
    return next((module for prefix, module in BENCH.items()
                 if command == prefix or command.startswith(prefix + " ")), None)


def test_every_command_is_run_or_checked() -> None:
    ran = run_commands()
    unaccounted = []
    for document, section, command in every_command():
        if command in ran or own_command_line(command) or bench_module(command) or \
                kubectl_vnc_line(command) is not None:
            continue
        if any(command.startswith(prefix) for prefix in CHECKED):
            continue
        unaccounted.append(f"{document} '## {section}': {command}")
    assert not unaccounted, (
        "commands that no test runs or checks; run them in a test, or add them to CHECKED in "
        f"{Path(__file__).name} with the test that checks them:\n  " + "\n  ".join(unaccounted))


def test_documented_command_lines_parse(tmp_path: Path) -> None:
    """Every documented `vncgate-relay` / `vncgate-operator` line is accepted by its parser,
    with the files it names made up (a token, a users file, a key)."""
    (tmp_path / "token").write_text("0123456789abcdef0123456789abcdef")
    (tmp_path / "session.key").write_text("k" * 48)
    (tmp_path / "users.yaml").write_text('alice: {secret: "a long enough secret"}\n')
    parsed = 0
    for document, section, command in every_command():
        words = own_command_line(command)
        if words is None:
            continue
        args: list[str] = []
        for word in words[1:]:
            if args and args[-1] in ("--api-token-file", "--users-file", "--session-secret-file",
                                     "--oidc-client-secret-file"):
                made = tmp_path / Path(word).name
                if not made.exists():
                    made.write_text("0123456789abcdef0123456789abcdef")
                word = str(made)
            elif args and args[-1] == "--targets":
                word = str(ROOT / word)
            args.append(word)
        try:
            if words[0] == "vncgate-relay":
                settings_from_args(args)
            else:
                operator_args(args, environ={})
        except SystemExit as exc:
            pytest.fail(f"{document} '## {section}': `{command}` is refused ({exc})")
        parsed += 1
    assert parsed >= 5


def test_documented_kubectl_vnc_lines_parse() -> None:
    """Every documented `kubectl vnc` line is accepted by the plugin's parser (what the lines do
    is run for real in tests/cluster/test_kubectl_vnc.py)."""
    parser = kubectl_vnc_parser()
    parsed = 0
    for document, section, command in every_command():
        words = kubectl_vnc_line(command)
        if words is None:
            continue
        try:
            parser.parse_args(words)
        except SystemExit as exc:
            pytest.fail(f"{document} '## {section}': `{command}` is refused ({exc})")
        parsed += 1
    assert parsed >= 6


def test_benchmark_lines_use_flags_that_exist() -> None:
    helps: dict[str, str] = {}
    checked = 0
    for document, section, command in every_command():
        module = bench_module(command)
        if module is None:
            continue
        if module not in helps:
            helps[module] = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT,
                                           capture_output=True, text=True, timeout=120,
                                           check=True).stdout
        words = shlex.split(command, comments=True)
        for flag in re.findall(r"(?<!\S)(--[a-z][-a-z]*)", " ".join(words)):
            assert flag in helps[module], f"{document} '## {section}': {module} has no {flag}"
            checked += 1
    assert checked >= 4


def test_scripts_test_runs_every_check() -> None:
    """README's `scripts/test` runs ruff, mypy, the import contract and pytest, as it says."""
    script = ROOT / "scripts" / "test"
    assert script.stat().st_mode & 0o111
    text = script.read_text()
    for tool in ("ruff", "mypy", "lint-imports", "pytest"):
        assert tool in text, f"scripts/test does not run {tool}"
