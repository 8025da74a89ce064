"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager.

The binaries are the envtest assets (`scripts/setup` unpacks ../shared/envtest/ into
.tools/envtest/; elsewhere `VNCGATE_ENVTEST_ASSETS` or kubebuilder's `KUBEBUILDER_ASSETS` name a
folder holding kube-apiserver, kube-controller-manager and kubectl of Kubernetes >= 1.30); etcd
is Debian's `etcd-server`. Certificates are made with openssl for each run. Everything listens
on 127.0.0.1 at free ports and is stopped by `close()`.

Components under test never get the admin credentials: `service_account_kubeconfig` writes a
kubeconfig with a ServiceAccount's token (`kubectl create token`), so they run with exactly the
RBAC that the chart grants.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from harness import reaper
from harness.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
BINARIES = ("kube-apiserver", "kube-controller-manager", "kubectl")


class ControlPlaneUnavailable(Exception):
    """The binaries are not on this machine; the message says how to get them."""


def assets_dir() -> Path:
    """The folder with the control-plane binaries, or ControlPlaneUnavailable saying why not."""
    candidates = [os.environ.get("VNCGATE_ENVTEST_ASSETS"), os.environ.get("KUBEBUILDER_ASSETS"),
                  str(ROOT / ".tools" / "envtest")]
    for candidate in filter(None, candidates):
        folder = Path(candidate)
        if all(os.access(folder / name, os.X_OK) for name in BINARIES):
            if shutil.which("etcd") is None:
                raise ControlPlaneUnavailable(
                    "etcd is not installed: `apt-get install etcd-server` (scripts/setup does)")
            return folder
    raise ControlPlaneUnavailable(
        "no Kubernetes control-plane binaries: run scripts/setup with ../shared/envtest/ beside "
        "the repository, or set VNCGATE_ENVTEST_ASSETS (or KUBEBUILDER_ASSETS) to a folder with "
        "kube-apiserver, kube-controller-manager and kubectl of Kubernetes >= 1.30")


# Ports this process handed out: a port is free when asked for, but nothing holds it until its
# user binds it, and the kernel may give the same one to the next bind(0) meanwhile (two relays
# of one test were once handed the same port: the second could not listen). Within one process,
# free_port() never returns a port twice.
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback TCP port that is free now and that this process has not handed out before."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no loopback port left that this process has not handed out already")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


class Certificates:
    """A CA and every certificate and key the control plane and its clients use."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ca_key, self.ca_crt = folder / "ca.key", folder / "ca.crt"
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-keyout", str(self.ca_key), "-out", str(self.ca_crt),
                 "-subj", "/CN=vncgate-test-ca")
        self.serving = self.issue("apiserver", "/CN=kube-apiserver", sans=(
            "IP:127.0.0.1", "DNS:localhost", "IP:10.96.0.1",
            "DNS:kubernetes.default.svc.cluster.local"))
        self.admin = self.issue("admin", "/O=system:masters/CN=admin")
        self.controller_manager = self.issue(
            "controller-manager", "/CN=system:kube-controller-manager")
        self.sa_key, self.sa_pub = folder / "sa.key", folder / "sa.pub"
        _openssl("genrsa", "-out", str(self.sa_key), "2048")
        _openssl("rsa", "-in", str(self.sa_key), "-pubout", "-out", str(self.sa_pub))
        # The aggregation layer's own CA (front proxy): the API server presents `front_proxy`
        # to aggregated API servers, which trust requests whose client certificate it signed.
        self.front_proxy_ca_key = folder / "front-proxy-ca.key"
        self.front_proxy_ca_crt = folder / "front-proxy-ca.crt"
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-keyout", str(self.front_proxy_ca_key), "-out", str(self.front_proxy_ca_crt),
                 "-subj", "/CN=vncgate-test-front-proxy-ca")
        self.front_proxy = self.issue("front-proxy-client", "/CN=front-proxy-client",
                                      ca=(self.front_proxy_ca_crt, self.front_proxy_ca_key))

    def issue(self, name: str, subject: str, sans: Sequence[str] = (),
              ca: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
        key, csr, crt = (self.folder / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                 "-subj", subject)
        extensions = self.folder / f"{name}.ext"
        lines = ["basicConstraints=CA:FALSE", "keyUsage=digitalSignature,keyEncipherment",
                 "extendedKeyUsage=serverAuth,clientAuth"]
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        extensions.write_text("\n".join(lines) + "\n")
        ca_crt, ca_key = ca or (self.ca_crt, self.ca_key)
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey",
                 str(ca_key), "-CAcreateserial", "-days", "2", "-out", str(crt),
                 "-extfile", str(extensions))
        return crt, key


def kubeconfig(server: str, ca: Path, *, token: str | None = None,
               client: tuple[Path, Path] | None = None, namespace: str = "default") -> str:
    user: dict[str, str] = {}
    if token is not None:
        user["token"] = token
    if client is not None:
        user["client-certificate"], user["client-key"] = str(client[0]), str(client[1])
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {
            "server": server, "certificate-authority-data":
                base64.b64encode(ca.read_bytes()).decode()}}],
        "users": [{"name": "test", "user": user}],
        "contexts": [{"name": "test", "context": {
            "cluster": "test", "user": "test", "namespace": namespace}}],
    })


class ControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager) for one test session."""

    def __init__(self, workdir: Path, *, controller_manager: bool = True,
                 apiserver_args: Sequence[str] = ()) -> None:
        self.bin = assets_dir()
        # More kube-apiserver flags, e.g. --authentication-config for an OpenID provider.
        self.apiserver_args = list(apiserver_args)
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._want_controller_manager = controller_manager
        self.certs = Certificates(workdir / "pki")
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.admin_kubeconfig = workdir / "admin.kubeconfig"
        self.admin_kubeconfig.write_text(kubeconfig(self.url, self.certs.ca_crt,
                                                    client=self.certs.admin))

    # -- processes -------------------------------------------------------------------------

    def _start(self, name: str, argv: list[str]) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        self._procs[name] = reaper.popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def _check_alive(self, name: str) -> None:
        proc = self._procs[name]
        if proc.poll() is not None:
            tail = (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    def start(self) -> ControlPlane:
        try:
            self._start_etcd()
            self.start_apiserver()
            if self._want_controller_manager:
                self._start_controller_manager()
        except BaseException:
            self.close()
            raise
        return self

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        self._start("etcd", [
            "etcd", "--data-dir", str(self.workdir / "etcd"), "--name", "default",
            "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"default=http://127.0.0.1:{peer}",
            # As clusters run it (kubeadm: 5s): the API server's watch cache of a resource
            # that nobody writes learns the current revision from these notifications. Without
            # them (Debian's etcd 3.4 does not answer the cache's progress requests), a watch
            # or list that must be current, e.g. a watch without resourceVersion, answers 504
            # "Too large resource version" until someone writes that resource.
            "--experimental-watch-progress-notify-interval=1s",
            "--unsafe-no-fsync"])

        def healthy() -> bool:
            self._check_alive("etcd")
            try:
                with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as reply:  # noqa: S310 - loopback http
                    return bool(json.load(reply).get("health") == "true")
            except OSError:
                return False

        wait_until(healthy, "etcd answering /health")

    def start_apiserver(self) -> None:
        """Start (or restart, after `stop_apiserver`) the API server on the same port."""
        c = self.certs
        self._start("kube-apiserver", [
            str(self.bin / "kube-apiserver"), f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}", f"--tls-cert-file={c.serving[0]}",
            f"--tls-private-key-file={c.serving[1]}", f"--client-ca-file={c.ca_crt}",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={c.sa_pub}",
            f"--service-account-signing-key-file={c.sa_key}",
            "--api-audiences=https://kubernetes.default.svc.cluster.local",
            "--service-cluster-ip-range=10.96.0.0/16", "--endpoint-reconciler-type=none",
            "--profiling=false", f"--cert-dir={self.workdir / 'apiserver-certs'}",
            # The aggregation layer, as clusters have it (KubeVirt's subresources.kubevirt.io
            # is an aggregated API): the API server proxies to a Service's endpoints directly.
            f"--requestheader-client-ca-file={c.front_proxy_ca_crt}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={c.front_proxy[0]}",
            f"--proxy-client-key-file={c.front_proxy[1]}",
            "--enable-aggregator-routing=true", *self.apiserver_args])
        wait_until(lambda: self._ready("kube-apiserver"), "kube-apiserver /readyz ok",
                   timeout=90)

    def stop_apiserver(self) -> None:
        self._stop("kube-apiserver")

    def _start_controller_manager(self) -> None:
        c = self.certs
        config = self.workdir / "controller-manager.kubeconfig"
        config.write_text(kubeconfig(self.url, c.ca_crt, client=c.controller_manager))
        self._start("kube-controller-manager", [
            str(self.bin / "kube-controller-manager"), f"--kubeconfig={config}",
            f"--authentication-kubeconfig={config}", f"--authorization-kubeconfig={config}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={c.sa_key}", f"--root-ca-file={c.ca_crt}",
            f"--cluster-signing-cert-file={c.ca_crt}", f"--cluster-signing-key-file={c.ca_key}",
            "--controllers=*"])
        # Ready when it has made the default ServiceAccount of a namespace.
        wait_until(lambda: self._check_alive("kube-controller-manager") is None and self.kubectl(
            "get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0,
            "the controller manager creating ServiceAccounts", timeout=90)

    def _ready(self, name: str) -> bool:
        self._check_alive(name)
        context = ssl.create_default_context(cafile=str(self.certs.ca_crt))
        context.load_cert_chain(*map(str, self.certs.admin))
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=2,  # noqa: S310 - https
                                        context=context) as reply:
                return bool(reply.read().strip() == b"ok")
        except OSError:
            return False

    def _stop(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc is not None:
            reaper.end(proc, grace=15)

    def close(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            self._stop(name)

    # -- clients ---------------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                kubeconfig_path: Path | None = None, timeout: float = 60
                ) -> subprocess.CompletedProcess[str]:
        """Run the real kubectl (admin unless `kubeconfig_path` says otherwise)."""
        result = subprocess.run(
            [str(self.bin / "kubectl"), f"--kubeconfig={kubeconfig_path or self.admin_kubeconfig}",
             *args], input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}{result.stderr}")
        return result

    def explain(self, field: str, timeout: float = 60) -> str:
        """`kubectl explain field`, asked again until it answers: the API server publishes a
        CRD's OpenAPI document asynchronously, and a document that answered once can still
        miss the resource for a moment after (kubernetes/kubernetes#136038)."""
        answer: list[str] = []

        def answered() -> bool:
            result = self.kubectl("explain", field, check=False)
            answer[:] = [result.stdout + result.stderr]
            return result.returncode == 0

        wait_until(answered, f"kubectl explain {field}", timeout,
                   context=lambda: answer[0] if answer else "")
        return answer[0]

    def get(self, *args: str, kubeconfig_path: Path | None = None) -> Any:
        """`kubectl get ... -o json`, parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json",
                                       kubeconfig_path=kubeconfig_path).stdout)

    def apply(self, manifest: str | dict[str, Any] | list[dict[str, Any]], *,
              check: bool = True) -> subprocess.CompletedProcess[str]:
        text = manifest if isinstance(manifest, str) else yaml.safe_dump_all(
            manifest if isinstance(manifest, list) else [manifest])
        return self.kubectl("apply", "-f", "-", input=text, check=check)

    def service_account_token(self, namespace: str, name: str, duration: str = "2h") -> str:
        return self.kubectl("create", "token", name, "-n", namespace,
                            f"--duration={duration}").stdout.strip()

    def service_account_kubeconfig(self, path: Path, namespace: str, name: str) -> Path:
        """A kubeconfig that authenticates as the ServiceAccount `namespace/name`."""
        path.write_text(kubeconfig(self.url, self.certs.ca_crt, namespace=namespace,
                                   token=self.service_account_token(namespace, name)))
        return path

    def in_cluster_files(self, folder: Path, namespace: str, name: str) -> dict[str, str]:
        """A pod's view of its ServiceAccount: token, CA and namespace files, and the
        environment variables that point at the API server, as the kubelet provides them."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "token").write_text(self.service_account_token(namespace, name))
        shutil.copy(self.certs.ca_crt, folder / "ca.crt")
        (folder / "namespace").write_text(namespace)
        return {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(self.port)}

    def log_tail(self, name: str, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return (self.logs / f"{name}.log").read_text(errors="replace")[-chars:]
        return ""
