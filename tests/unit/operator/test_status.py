from __future__ import annotations

from typing import Any

from vncgate.common.model import (
    LOGIN_FORBIDDEN,
    LOGIN_OK,
    LOGIN_REFUSED,
    LOGIN_UNREADABLE,
    LoginOutcome,
    Route,
)
from vncgate.common.spec import Credentials
from vncgate.operator.probe import ProbeResult
from vncgate.operator.resolve import TargetInvalid
from vncgate.operator.secretaccess import login_verdict
from vncgate.operator.status import (
    Observation,
    Registration,
    build_status,
    kept_condition,
    status_changes,
)

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"
OK_REG = Registration(True, "Registered", "route served by 2 relay replicas")
OK_PROBE = ProbeResult(True, "RFBGreeting", "answered RFB 003.008", "RFB 003.008")
DOWN = ProbeResult(False, "ConnectionRefused", "10.0.0.5:5900 refused the connection")
URL = "https://vnc.example.com/t/lab/desk-1/"


def build(current: dict[str, Any] | None, obs: Observation, now: str = T0,
          generation: int | None = 3) -> dict[str, Any]:
    return build_status(current, obs, generation=generation, url=URL, now=now)


def by_type(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_ready() -> None:
    status = build(None, Observation("10.0.0.5:5900", registration=OK_REG, probe=OK_PROBE,
                                     sessions=2))
    assert status["phase"] == "Ready"
    assert status["url"] == URL and status["endpoint"] == "10.0.0.5:5900"
    assert status["serverVersion"] == "RFB 003.008"
    assert status["activeSessions"] == 2 and status["observedGeneration"] == 3
    conditions = by_type(status)
    assert [c["status"] for c in conditions.values()] == ["True", "True", "True"]
    assert conditions["Ready"]["observedGeneration"] == 3
    assert all(c["lastTransitionTime"] == T0 for c in conditions.values())


def test_unreachable_wins_over_pending_and_drops_the_version() -> None:
    ready = build(None, Observation("e", registration=OK_REG, probe=OK_PROBE))
    status = build(ready, Observation("e", registration=OK_REG, probe=DOWN), now=T1)
    assert status["phase"] == "Unreachable"
    assert status["serverVersion"] is None
    ready_condition = by_type(status)["Ready"]
    assert (ready_condition["reason"], ready_condition["lastTransitionTime"]) == (
        "ConnectionRefused", T1)
    assert by_type(status)["Registered"]["lastTransitionTime"] == T0  # did not flip
    assert status_changes(ready, status)["serverVersion"] is None  # removed by the patch


def test_invalid() -> None:
    invalid = TargetInvalid("ServiceNotFound", "Service lab/desk does not exist; create it")
    status = build(None, Observation("service/desk:vnc", invalid=invalid))
    assert status["phase"] == "Invalid"
    conditions = by_type(status)
    assert conditions["Ready"]["reason"] == "ServiceNotFound"
    assert conditions["Ready"]["message"] == invalid.message
    assert conditions["Registered"]["status"] == "False"
    assert conditions["Reachable"]["status"] == "Unknown"


def test_pending_until_registered_and_probed() -> None:
    status = build(None, Observation("e"))
    assert status["phase"] == "Pending"
    assert by_type(status)["Ready"]["reason"] == "NotRegistered"
    status = build(None, Observation("e", registration=OK_REG))
    assert (status["phase"], by_type(status)["Ready"]["reason"]) == ("Pending", "NotProbed")
    failing = Registration(False, "RelayUnavailable", "1 of 2 relay replicas did not answer")
    status = build(None, Observation("e", registration=failing, probe=OK_PROBE))
    assert (status["phase"], by_type(status)["Ready"]["reason"]) == ("Pending", "RelayUnavailable")


def test_unobserved_parts_keep_their_values() -> None:
    ready = build(None, Observation("e", registration=OK_REG, probe=OK_PROBE, sessions=4))
    resumed = build(ready, Observation("e"), now=T1)  # what a resume sees: only the route
    assert resumed["phase"] == "Ready"
    assert resumed["serverVersion"] == "RFB 003.008" and resumed["activeSessions"] == 4
    assert status_changes(ready, resumed) == {}


def test_only_changes_are_patched() -> None:
    first = build(None, Observation("e", registration=OK_REG, probe=OK_PROBE, sessions=0))
    same = build(first, Observation("e", registration=OK_REG, probe=OK_PROBE, sessions=0), now=T1)
    assert status_changes(first, same) == {}
    more = build(first, Observation("e", registration=OK_REG, probe=OK_PROBE, sessions=1), now=T1)
    assert status_changes(first, more) == {"activeSessions": 1}
    newer = build_status(first, Observation("e", registration=OK_REG, probe=OK_PROBE,
                                            sessions=0), generation=4, url=URL, now=T1)
    changes = status_changes(first, newer)
    assert set(changes) == {"observedGeneration", "conditions"}
    assert all(c["lastTransitionTime"] == T0 for c in changes["conditions"])


def test_url_removed_when_no_public_url() -> None:
    first = build(None, Observation("e"))
    without = build_status(first, Observation("e"), generation=3, url=None, now=T1)
    assert status_changes(first, without) == {"url": None}
    assert status_changes({}, without).get("url", "absent") == "absent"


def test_viewers_are_shown_and_kept_when_not_looked_at() -> None:
    status = build(None, Observation("10.0.0.5:5900", registration=OK_REG, probe=OK_PROBE,
                                     sessions=2, viewers="alice, bob"))
    assert status["viewers"] == "alice, bob"
    kept = build(status, Observation("10.0.0.5:5900"))
    assert kept["viewers"] == "alice, bob"


def test_a_server_blocking_the_address_is_unreachable_never_ready() -> None:
    # What probe.refusal() makes of TigerVNC's "Too many security failures" (tested there).
    blocked = ProbeResult(False, "Blacklisted", "127.0.0.1:5901 is blocking connections from "
                          "this address (the server says 'Too many security failures')",
                          blocked=True)
    ready = build(None, Observation("e", registration=OK_REG, probe=OK_PROBE))
    status = build(ready, Observation("e", registration=OK_REG, probe=blocked), now=T1)
    assert status["phase"] == "Unreachable"
    assert status["serverVersion"] is None
    conditions = by_type(status)
    assert (conditions["Reachable"]["status"], conditions["Reachable"]["reason"]) == (
        "False", "Blacklisted")
    assert (conditions["Ready"]["status"], conditions["Ready"]["reason"]) == (
        "False", "Blacklisted")
    assert "blocking connections from this address" in conditions["Ready"]["message"]
    assert conditions["Registered"]["status"] == "True"  # the route stays on the relays


def test_insecure_skip_verify_is_a_warning_condition_and_the_phase_stays_ready() -> None:
    insecure = build(None, Observation("e", registration=OK_REG, probe=OK_PROBE,
                                       tls_verified=False))
    assert insecure["phase"] == "Ready"
    tls = by_type(insecure)["TLSVerified"]
    assert (tls["status"], tls["reason"]) == ("False", "InsecureSkipVerify")
    assert "does not check the server's identity" in tls["message"]
    assert by_type(insecure)["Ready"]["status"] == "True"

    # A CA given later: the condition flips to True (and moves its transition time).
    verified = build(insecure, Observation("e", registration=OK_REG, probe=OK_PROBE,
                                           tls_verified=True), now=T1)
    tls = by_type(verified)["TLSVerified"]
    assert (tls["status"], tls["reason"], tls["lastTransitionTime"]) == (
        "True", "CertificateVerified", T1)
    assert status_changes(insecure, verified) == {"conditions": verified["conditions"]}

    # spec.tls removed: no TLS condition at all; an invalid spec has none either.
    plain = build(verified, Observation("e", registration=OK_REG, probe=OK_PROBE), now=T1)
    assert "TLSVerified" not in by_type(plain)
    invalid = build(insecure, Observation("e", invalid=TargetInvalid("X", "fix it"),
                                          tls_verified=False))
    assert "TLSVerified" not in by_type(invalid)


def test_a_refused_credential_from_the_relays_is_not_ready() -> None:
    route = Route("lab", "bmc", "10.0.0.5", 5900, credentials=Credentials(secret_name="bmc-login"))
    assert login_verdict(route, None) is None
    assert login_verdict(route, LoginOutcome(LOGIN_OK, 1_700_000_000.0)) is None
    refused = login_verdict(route, LoginOutcome(
        LOGIN_REFUSED, 1_700_000_000.0,
        "the VNC server of lab/bmc refused the stored credential (Authentication\x1b failed)"))
    assert refused is not None and (refused.ok, refused.reason) == (False, "CredentialRefused")
    assert "2023-11-14T22:13:20Z" in refused.message
    assert "Secret lab/bmc-login" in refused.message and "\x1b" not in refused.message
    status = build(None, Observation("e", registration=OK_REG, probe=refused))
    assert status["phase"] == "Unreachable"
    assert by_type(status)["Ready"]["reason"] == "CredentialRefused"
    unreadable = login_verdict(route, LoginOutcome(LOGIN_UNREADABLE, 1.0,
                                                   "Secret lab/bmc-login does not exist"))
    assert unreadable is not None and unreadable.reason == "CredentialsNotReadable"
    assert "does not exist" in unreadable.message


def test_a_relays_forbidden_older_than_the_access_reviews_yes_is_stale() -> None:
    route = Route("lab", "bmc", "10.0.0.5", 5900, credentials=Credentials(secret_name="bmc-login"))
    forbidden = LoginOutcome(LOGIN_FORBIDDEN, 100.0, "needs a RoleBinding to ClusterRole x")
    # No review says the relay may read it: the relay's word stands.
    said = login_verdict(route, forbidden, None)
    assert said is not None and said.reason == "CredentialsNotReadable"
    # The reviews have said so since after it: a RoleBinding was made since; stale.
    assert login_verdict(route, forbidden, 150.0) is None
    # The relay was refused after the reviews began to allow: they disagree; the relay wins.
    assert login_verdict(route, forbidden, 50.0) is not None
    # A missing Secret is beyond an access review's sight: it stands.
    missing = LoginOutcome(LOGIN_UNREADABLE, 100.0, "Secret lab/bmc-login does not exist")
    assert login_verdict(route, missing, 150.0) is not None


def test_a_console_kept_for_another_client_is_a_condition_and_the_phase_stays_ready() -> None:
    held = (False, "HeldByAnotherClient", "KubeVirt kept the VM's console ...")
    status = build(None, Observation("kubevirt/lab/vm-1", registration=OK_REG, probe=OK_PROBE,
                                     console=held))
    assert status["phase"] == "Ready" and by_type(status)["Ready"]["status"] == "True"
    console = by_type(status)["ConsoleAvailable"]
    assert (console["status"], console["reason"]) == ("False", "HeldByAnotherClient")

    # Opened later: the condition flips (and moves its transition time).
    opened = build(status, Observation("kubevirt/lab/vm-1", registration=OK_REG, probe=OK_PROBE,
                                       console=(True, "ConsoleOpened", "opened")), now=T1)
    console = by_type(opened)["ConsoleAvailable"]
    assert (console["status"], console["lastTransitionTime"]) == ("True", T1)
    # Not known this time: what status said is kept; none at all without it.
    assert kept_condition(opened, "ConsoleAvailable") == (True, "ConsoleOpened", "opened")
    assert kept_condition(None, "ConsoleAvailable") is None
    plain = build(opened, Observation("kubevirt/lab/vm-1", registration=OK_REG, probe=OK_PROBE))
    assert "ConsoleAvailable" not in by_type(plain)
    invalid = build(status, Observation("e", invalid=TargetInvalid("X", "fix it"), console=held))
    assert "ConsoleAvailable" not in by_type(invalid)
