"""Run a Deployment's container from the real API server as a local process, the way a kubelet
would: its command and args, its env, its Secret volumes, its ServiceAccount's credentials.

The control plane here has no node, so the chart's pods stay Pending. `LocalPod` reads what the
chart actually created (the Deployment, the Secrets it mounts, the ServiceAccount it names) and
starts the same console script with the same flags, the Secrets written to local files (mount
paths in flags and env are rewritten to them) and in-cluster credentials: a token made for the
pod's ServiceAccount, mounted where a pod has it, with KUBERNETES_SERVICE_HOST/PORT set. So the
process has exactly the chart's configuration and the chart's RBAC. What a test must change
(listen addresses, how the operator finds the relay without pods) it changes explicitly.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from harness.cluster import ControlPlane
from tests.support.processes import ConsoleScript

ArgsEdit = Callable[[list[str]], list[str]]


def replace_flag(args: list[str], flag: str, value: str | None) -> list[str]:
    """Every `--flag=...` dropped, then `--flag=value` added (unless value is None)."""
    kept = [arg for arg in args if not (arg == flag or arg.startswith(f"{flag}="))]
    return kept if value is None else [*kept, f"{flag}={value}"]


class LocalPod:
    def __init__(self, plane: ControlPlane, namespace: str, deployment: str, workdir: Path,
                 pod_name: str | None = None) -> None:
        self.plane = plane
        self.namespace = namespace
        self.workdir = workdir
        self.pod_name = pod_name or f"{deployment}-local"
        self.deployment: dict[str, Any] = plane.get("deployment", deployment, "-n", namespace)
        spec = self.deployment["spec"]["template"]["spec"]
        self.service_account = spec.get("serviceAccountName") or "default"
        self.automount = spec.get("automountServiceAccountToken", True)
        self.container = spec["containers"][0]
        self._volumes = {volume["name"]: volume for volume in spec.get("volumes") or []}

    def _materialise(self) -> dict[str, str]:
        """Each Secret and ConfigMap volume's items as files; mount path -> local folder."""
        mounts: dict[str, str] = {}
        for mount in self.container.get("volumeMounts") or []:
            volume = self._volumes[mount["name"]]
            local = self.workdir / "volumes" / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            if "secret" in volume:
                secret = self.plane.get("secret", volume["secret"]["secretName"],
                                        "-n", self.namespace)
                items = volume["secret"].get("items") or [
                    {"key": key, "path": key} for key in secret.get("data") or {}]
                for item in items:
                    target = local / item["path"]
                    target.write_bytes(base64.b64decode(secret["data"][item["key"]]))
                    target.chmod(0o400)
            elif "configMap" in volume:
                config_map = self.plane.get("configmap", volume["configMap"]["name"],
                                            "-n", self.namespace)
                for key, text in (config_map.get("data") or {}).items():
                    (local / key).write_text(text)
            elif "emptyDir" not in volume:
                raise NotImplementedError(
                    f"volume {mount['name']}: only Secret, ConfigMap and emptyDir")
            mounts[mount["mountPath"].rstrip("/")] = str(local)
        return mounts

    @staticmethod
    def _rewrite(value: str, mounts: Mapping[str, str]) -> str:
        """A path below a mount (alone or as `--flag=PATH`) pointed at the local folder."""
        prefix, _, path = value.rpartition("=") if value.startswith("--") else ("", "", value)
        for mount_path in sorted(mounts, key=len, reverse=True):
            if path == mount_path or path.startswith(mount_path + "/"):
                path = mounts[mount_path] + path[len(mount_path):]
                break
        return f"{prefix}={path}" if prefix else path

    def command(self, edit: ArgsEdit | None = None) -> tuple[str, list[str], dict[str, str]]:
        mounts = self._materialise()
        command = self.container.get("command") or []
        assert len(command) == 1, f"expected one console script as the command, got {command}"
        args = [self._rewrite(arg, mounts) for arg in self.container.get("args") or []]
        env: dict[str, str] = {}
        for item in self.container.get("env") or []:
            if "value" in item:
                env[item["name"]] = self._rewrite(str(item["value"]), mounts)
            elif (item.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") == \
                    "metadata.name":
                env[item["name"]] = self.pod_name
            elif (item.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") == \
                    "metadata.namespace":
                env[item["name"]] = self.namespace
            else:
                raise NotImplementedError(f"env {item['name']}: {item}")
        return command[0], edit(args) if edit else args, env

    def script(self, edit: ArgsEdit | None = None, hosts: Mapping[str, str] | None = None,
               extra_env: Mapping[str, str] | None = None) -> ConsoleScript:
        name, args, env = self.command(edit)
        service_account = None
        if self.automount:
            service_account = self.workdir / "serviceaccount"
            env.update(self.plane.in_cluster_files(service_account, self.namespace,
                                                   self.service_account))
        env.update(extra_env or {})
        return ConsoleScript(name, args, self.workdir, env=env, hosts=hosts,
                             service_account=service_account)
