"""Build every artifact of a release into dist/VERSION/ (run through scripts/release).

VERSION is a SemVer version that is also a PEP 440 one (1.2.0, 1.2.0-rc.1, 0.0.0-dev.1): the
chart and the image use it as written, the Python distributions in its PEP 440 form. The version
is set in a copy of the source made for this build; nothing in the work tree changes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path

from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
HELM = ROOT / ".tools" / "helm" / "helm"
PYTHON = sys.executable
REPOSITORY = "https://github.com/vncgate/vncgate"
IMAGE_REPOSITORY = "ghcr.io/vncgate/vncgate"
SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
                    r"(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?")
NOVNC = ("relay/static/novnc/core", "relay/static/novnc/vendor")
KUBECTL = ROOT / "packaging" / "kubectl"
SBIN_PATH = f"{os.environ.get('PATH', '')}:/usr/local/sbin:/usr/sbin:/sbin"
IMAGE_TOOLS = ("buildah", "debootstrap")


class ReleaseError(Exception):
    """What stopped the release, in words that say what to do."""


def say(message: str) -> None:
    print(f"release: {message}", flush=True)


def run(*args: str | Path, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    command = [str(arg) for arg in args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False,
                            env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise ReleaseError(f"{' '.join(command)} failed (exit {result.returncode}):\n"
                           f"{(result.stdout + result.stderr)[-4000:]}")
    return result.stdout


def python_version(version: str) -> str:
    if not SEMVER.fullmatch(version):
        raise ReleaseError(f"{version!r} is not a SemVer version (MAJOR.MINOR.PATCH[-PRERELEASE]),"
                           " which Helm needs for the chart, e.g. 1.2.0 or 1.2.0-rc.1")
    try:
        return str(Version(version))
    except InvalidVersion:
        raise ReleaseError(
            f"{version!r} has no PEP 440 form for the Python distributions: use a pre-release "
            "Python understands, e.g. 1.2.0-rc.1, 1.2.0-beta.2 or 0.0.0-dev.1") from None


def replace_once(path: Path, pattern: str, replacement: str) -> None:
    text = path.read_text()
    new, count = re.subn(pattern, replacement, text, count=1, flags=re.MULTILINE)
    if count != 1:
        raise ReleaseError(f"{path}: found no line matching {pattern!r} to set the version in")
    path.write_text(new)


def copy_source(stage: Path) -> Path:
    """The files git knows (tracked, and new ones not ignored) plus the placed noVNC client."""
    missing = [path for path in NOVNC if not (ROOT / path).is_dir()]
    if missing:
        raise ReleaseError(f"{', '.join(missing)} missing: run scripts/setup (it places noVNC)")
    listing = run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    source = stage / "src"
    for name in filter(None, listing.split("\0")):
        origin = ROOT / name
        if origin.is_file():  # a tracked file deleted in the work tree is not released
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, source / name)
    for path in NOVNC:
        shutil.copytree(ROOT / path, source / path)
    return source


def set_versions(source: Path, pyversion: str) -> None:
    replace_once(source / "pyproject.toml", r'^version = ".*"$', f'version = "{pyversion}"')
    replace_once(source / "packaging/kubectl/pyproject.toml", r'^version = ".*"',
                 f'version = "{pyversion}"')
    replace_once(source / "common/__init__.py", r'^__version__ = ".*"$',
                 f'__version__ = "{pyversion}"')


def build_python(source: Path, out: Path) -> None:
    say("building the vncgate sdist and wheel (python -m build)")
    run(PYTHON, "-m", "build", "--outdir", out, source)


def kubectl_source(source: Path, stage: Path) -> Path:
    """The folder the vncgate-kubectl distribution is built from (packaging/kubectl/pyproject)."""
    folder = stage / "kubectl-dist"
    config = tomllib.loads((source / "packaging/kubectl/pyproject.toml").read_text())
    modules = config["tool"]["vncgate-release"]["common-modules"]
    folder.mkdir()
    shutil.copy2(source / "packaging/kubectl/pyproject.toml", folder / "pyproject.toml")
    shutil.copy2(source / "packaging/kubectl/README.md", folder / "README.md")
    shutil.copy2(source / "LICENSE", folder / "LICENSE")
    shutil.copytree(source / "kubectl", folder / "kubectl",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "common").mkdir()
    for name in [*(f"{module}.py" for module in modules), "py.typed"]:
        shutil.copy2(source / "common" / name, folder / "common" / name)
    return folder


def build_kubectl(source: Path, stage: Path, out: Path) -> Path:
    say("building the vncgate-kubectl sdist and wheel")
    folder = kubectl_source(source, stage)
    wheels = stage / "kubectl-wheels"
    run(PYTHON, "-m", "build", "--outdir", wheels, folder)
    for built in wheels.iterdir():
        shutil.copy2(built, out / built.name)
    (wheel,) = wheels.glob("vncgate_kubectl-*.whl")
    return wheel


def build_zipapp(wheel: Path, stage: Path, out: Path) -> Path:
    """kubectl-vnc.pyz: the plugin and its dependencies, pure Python only, for Linux and macOS."""
    say("building the kubectl-vnc zipapp (shiv)")
    local = stage / "pure-wheels"
    # PyYAML publishes compiled wheels and an sdist; built without libyaml it is pure Python.
    run(PYTHON, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-binary", "pyyaml",
        "--wheel-dir", local, "pyyaml", env={"PYYAML_FORCE_LIBYAML": "0"})
    site = stage / "zipapp-site"
    run(PYTHON, "-m", "pip", "install", "--quiet", "--no-compile", "--target", site,
        "--only-binary=:all:", "--platform", "any", "--implementation", "py",
        "--python-version", "3.11", "--abi", "none", "--find-links", local, wheel)
    compiled = sorted(str(path.relative_to(site)) for path in site.rglob("*")
                      if path.suffix in (".so", ".pyd", ".dylib", ".dll"))
    if compiled:
        raise ReleaseError(f"the zipapp would hold compiled code, which runs on one platform "
                           f"only: {', '.join(compiled)}")
    shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts with this machine's paths
    zipapp = out / "kubectl-vnc.pyz"
    run(PYTHON, "-m", "shiv", "--site-packages", site, "--entry-point",
        "vncgate.kubectl.cli:main", "--preamble", KUBECTL / "preamble.py",
        "--python", "/usr/bin/env python3", "--reproducible", "--output-file", zipapp,
        env={"SOURCE_DATE_EPOCH": "315532800"})
    zipapp.chmod(0o755)
    return zipapp


def _tar_member(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 315532800
    return info


def build_krew(zipapp: Path, out: Path, version: str) -> None:
    say("packing kubectl-vnc.tar.gz and filling the krew manifest")
    archive = out / "kubectl-vnc.tar.gz"
    with tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        tar.add(zipapp, arcname="kubectl-vnc", filter=_tar_member)
        tar.add(ROOT / "LICENSE", arcname="LICENSE", filter=_tar_member)
    digest = sha256(archive)
    tag = f"v{version}"
    text = (ROOT / "packaging/krew/vnc.yaml").read_text()
    text = re.sub(r'\{\{ addURIAndSha "([^"]+)" \.TagName \}\}',
                  lambda m: f"uri: {m.group(1)}\n      sha256: {digest}", text)
    text = text.replace("{{ .TagName }}", tag)
    if "{{" in text:
        raise ReleaseError("packaging/krew/vnc.yaml has a template expression this script does "
                           "not fill")
    (out / "vnc.yaml").write_text(text)


def build_image(source: Path, stage: Path, out: Path, version: str,
                install_tools: bool) -> tuple[str, Path]:
    """The image from the release's source, as an OCI archive; its manifest digest and the pins
    of its Python packages."""
    say("building the image (scripts/build-image) and saving it as an OCI archive")
    tag = f"localhost/vncgate-release:{version}-{os.getpid()}"  # one per build
    env = {"PATH": SBIN_PATH}
    run(source / "scripts/build-image", "--tag", tag,
        *(["--install-tools"] if install_tools else []), cwd=source, env=env)
    archive = out / f"vncgate-image-{version}.oci.tar"
    digest_file = stage / "image-digest"
    run("buildah", "push", "--quiet", "--digestfile", digest_file, tag,
        f"oci-archive:{archive}:{IMAGE_REPOSITORY}:{version}", env=env)
    digest = digest_file.read_text().strip()
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise ReleaseError(f"buildah push gave no digest ({digest!r})")
    container = f"vncgate-release-{os.getpid()}"
    run("buildah", "from", "--pull-never", "--name", container, tag, env=env)
    try:
        frozen = run("buildah", "run", "--isolation", "chroot", container, "--",
                     "python", "-m", "pip", "freeze", "--all", env=env)
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True, check=False,
                       env={**os.environ, **env})
        subprocess.run(["buildah", "rmi", tag], capture_output=True, check=False,
                       env={**os.environ, **env})
    # vncgate itself (`vncgate @ file:///dist/...`) is the SBOM's root component, not a part.
    parts = [line for line in frozen.splitlines()
             if re.split(r"[ =@<>!~;\[]", line.strip(), maxsplit=1)[0].lower() != "vncgate"]
    requirements = stage / "image-requirements.txt"
    requirements.write_text("".join(f"{line}\n" for line in parts))
    return digest, requirements


def resolved_requirements(wheel: Path, source: Path, stage: Path) -> Path:
    """What installing the wheel as the image does (with constraints.txt) resolves to (pip's
    dry-run report), as pins."""
    report = stage / "resolve.json"
    run(PYTHON, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
        "--report", report, "-c", source / "constraints.txt", wheel)
    installs = json.loads(report.read_text())["install"]
    pins = sorted(f"{item['metadata']['name']}=={item['metadata']['version']}"
                  for item in installs if item["metadata"]["name"] != "vncgate")
    requirements = stage / "wheel-requirements.txt"
    requirements.write_text("".join(f"{pin}\n" for pin in pins))
    return requirements


def build_sbom(requirements: Path, source: Path, out: Path, version: str) -> None:
    say("writing the CycloneDX SBOM (cyclonedx-py)")
    run(PYTHON, "-m", "cyclonedx_py", "requirements", requirements,
        "--pyproject", source / "pyproject.toml", "--output-reproducible",
        "--output-file", out / f"vncgate-{version}.cdx.json")


def build_chart(source: Path, stage: Path, out: Path, version: str, digest: str | None) -> None:
    say("packaging the chart (helm package) and its index.yaml")
    if not HELM.exists():
        raise ReleaseError(f"helm is not at {HELM}: run scripts/setup")
    chart = stage / "chart" / "vncgate"
    shutil.copytree(source / "charts/vncgate", chart)
    if digest is not None:
        # The image as released, pulled by digest: the first `digest:` under `image:`.
        replace_once(chart / "values.yaml", r'(^image:\n(?:[ #].*\n)*?  digest: )""$',
                     rf'\g<1>"{digest}"')
    run(HELM, "package", chart, "--version", version, "--app-version", version,
        "--destination", out, env={"HOME": str(stage)})
    run(HELM, "repo", "index", out, "--url", f"{REPOSITORY}/releases/download/v{version}",
        env={"HOME": str(stage)})


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(out: Path) -> None:
    files = sorted(path for path in out.iterdir() if path.is_file() and path.name != "SHA256SUMS")
    (out / "SHA256SUMS").write_text("".join(f"{sha256(path)}  {path.name}\n" for path in files))


def image_prerequisites(install_tools: bool) -> None:
    """Stop before the slow parts when this machine cannot build the image."""
    if os.geteuid() != 0:
        raise ReleaseError(
            "building the image needs root (debootstrap and buildah's storage): run "
            "`sudo scripts/release VERSION`, or `scripts/release VERSION --no-image` for every "
            "other artifact (no OCI archive, no digest in the chart, the SBOM from the wheel's "
            "resolved requirements)")
    missing = [tool for tool in IMAGE_TOOLS if shutil.which(tool, path=SBIN_PATH) is None]
    if missing and not install_tools:
        raise ReleaseError(
            f"building the image needs {' and '.join(missing)}: `apt-get install "
            f"{' '.join(missing)}`, or rerun with --install-tools (the default when CI=true), "
            "or --no-image for every other artifact")


def release(version: str, image: bool, install_tools: bool = False,
            out: Path | None = None) -> Path:
    pyversion = python_version(version)
    if image:
        image_prerequisites(install_tools)
    out = (out or ROOT / "dist" / version).resolve()
    if out.exists() and any(out.iterdir()):
        if not out.is_relative_to(ROOT / "dist"):
            raise ReleaseError(f"{out} is not empty: give an empty or new folder to --out")
        shutil.rmtree(out)  # an earlier build of this version under dist/
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix=f"vncgate-release-{version}-") as tmp:
        stage = Path(tmp)
        source = copy_source(stage)
        set_versions(source, pyversion)
        build_python(source, out)
        (wheel,) = out.glob("vncgate-*.whl")
        plugin_wheel = build_kubectl(source, stage, out)
        build_krew(build_zipapp(plugin_wheel, stage, out), out, version)
        digest = None
        if image:
            digest, requirements = build_image(source, stage, out, version, install_tools)
        else:
            requirements = resolved_requirements(wheel, source, stage)
        build_sbom(requirements, source, out, version)
        build_chart(source, stage, out, version, digest)
    write_checksums(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/release", description="Build every artifact of a release into "
        "dist/VERSION/: the vncgate and vncgate-kubectl wheels and sdists, the kubectl-vnc "
        "zipapp and its krew archive and manifest, the image as an OCI archive, the chart "
        "(image digest pinned) and its index.yaml, a CycloneDX SBOM, SHA256SUMS.")
    parser.add_argument("version", metavar="VERSION",
                        help="SemVer that is also PEP 440, e.g. 1.2.0, 1.2.0-rc.1, 0.0.0-dev.1")
    parser.add_argument("--no-image", action="store_true",
                        help="skip the image (slow; needs root and buildah): no OCI archive, no "
                             "digest in the chart, the SBOM from the wheel's resolved "
                             "requirements instead of the image's packages")
    parser.add_argument("--install-tools", action="store_true",
                        default=os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"),
                        help="let scripts/build-image install buildah and debootstrap with "
                             "apt-get when missing (the default when CI=true)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="an empty or new folder for the artifacts (default dist/VERSION, "
                             "emptied first)")
    args = parser.parse_args(argv)
    try:
        out = release(args.version, image=not args.no_image, install_tools=args.install_tools,
                      out=args.out)
    except ReleaseError as exc:
        print(f"release: {exc}", file=sys.stderr)
        return 1
    say(f"done: {out}")
    for path in sorted(out.iterdir()):
        print(f"  {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
