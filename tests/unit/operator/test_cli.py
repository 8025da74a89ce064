from __future__ import annotations

import pytest

from vncgate.operator.cli import main, namespaces_to_watch
from vncgate.operator.handlers import build_registry
from vncgate.operator.settings import OperatorSettings


def test_help_exits_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--relay-service" in capsys.readouterr().out


def test_relay_namespace_is_watched_in_namespaced_mode() -> None:
    settings = OperatorSettings(namespaces=("lab",), relay_service=("vncgate", "relay"))
    assert namespaces_to_watch(settings) == ("lab", "vncgate")
    assert namespaces_to_watch(OperatorSettings(relay_service=("vncgate", "relay"))) == ()


def test_registries_are_fresh() -> None:
    one, two = build_registry(OperatorSettings()), build_registry(OperatorSettings())
    assert one is not two
