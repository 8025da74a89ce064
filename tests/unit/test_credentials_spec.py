"""spec.credentials and spec.tls: parsed alike by the standalone relay and the operator; the
registration API and the operator refuse what would make the relay read its own files."""

from __future__ import annotations

import pytest

from vncgate.common.model import Route, route_from_json
from vncgate.common.spec import Credentials, SpecError, TlsSpec, parse_spec
from vncgate.operator.resolve import TargetInvalid, check_cluster_credentials
from vncgate.operator.secretaccess import references, review

ENDPOINT = {"address": {"host": "10.20.0.15", "port": 5900}}


def test_secret_name_and_tls_parse() -> None:
    spec = parse_spec({"endpoint": ENDPOINT, "credentials": {"secretName": "bmc-vnc"},
                       "tls": {"caSecret": {"name": "lab-ca"}, "serverName": "bmc1.lab"}})
    assert spec.credentials == Credentials(secret_name="bmc-vnc")
    assert spec.tls is not None and spec.tls.ca_secret is not None
    assert (spec.tls.ca_secret.key, spec.tls.server_name) == ("ca.crt", "bmc1.lab")


@pytest.mark.parametrize(("body", "field", "words"), [
    ({"credentials": {"password": "hunter2"}}, "spec.credentials.password", "never written"),
    ({"credentials": {}}, "spec.credentials", "exactly one"),
    ({"credentials": {"secretName": "a", "passwordEnv": "B"}}, "spec.credentials",
     "exactly one"),
    ({"credentials": {"passwordEnv": "1BAD"}}, "spec.credentials.passwordEnv", "variable"),
    ({"credentials": {"secretName": "a", "username": "x"}}, "spec.credentials.username",
     "Secret's key"),
    ({"tls": {"caFile": "/ca.pem", "insecureSkipVerify": True}},
     "spec.tls.insecureSkipVerify", "not both"),
    ({"tls": {"caFile": "/a", "caSecret": {"name": "b"}}}, "spec.tls", "at most one"),
    ({"tls": {"insecureSkipVerify": "yes"}}, "spec.tls.insecureSkipVerify", "true or false"),
])
def test_bad_credentials_say_what_to_fix(body: dict[str, object], field: str,
                                         words: str) -> None:
    with pytest.raises(SpecError) as error:
        parse_spec({"endpoint": ENDPOINT, **body})
    assert error.value.field == field and words in error.value.message


def test_the_password_never_appears_in_an_error() -> None:
    with pytest.raises(SpecError) as error:
        parse_spec({"endpoint": ENDPOINT, "credentials": {"password": "hunter2"}})
    assert "hunter2" not in str(error.value)


def test_registration_api_refuses_files_and_variables() -> None:
    for body, field in (({"credentials": {"passwordFile": "/var/run/secrets/token"}},
                         "credentials"),
                        ({"credentials": {"passwordEnv": "HOME"}}, "credentials"),
                        ({"tls": {"caFile": "/etc/passwd"}}, "tls.caFile")):
        with pytest.raises(SpecError) as error:
            route_from_json({"endpoint": {"host": "10.0.0.5", "port": 5900}, **body}, "lab", "x")
        assert error.value.field == field and "standalone" in error.value.message


def test_route_json_round_trip_carries_names_only() -> None:
    route = Route("lab", "bmc", "10.0.0.5", 5900, credentials=Credentials(secret_name="bmc"),
                  tls=TlsSpec(insecure_skip_verify=True))
    assert route_from_json(route.to_json()) == route
    assert route.to_json()["credentials"] == {"secretName": "bmc"}


def test_operator_marks_standalone_sources_invalid() -> None:
    spec = parse_spec({"endpoint": ENDPOINT, "credentials": {"passwordEnv": "PW"}})
    with pytest.raises(TargetInvalid) as error:
        check_cluster_credentials(spec)
    assert error.value.reason == "StandaloneCredentials" and "secretName" in error.value.message


def test_operator_asks_about_every_object_the_relay_reads() -> None:
    route = Route("lab", "bmc", "10.0.0.5", 5900, credentials=Credentials(secret_name="pw"),
                  tls=TlsSpec(ca_config_map=None, ca_secret=None, server_name="bmc"))
    assert references(route) == [("secrets", "pw")]
    body = review(("vncgate", "vncgate-relay"), "lab", "secrets", "pw")
    assert body["spec"]["user"] == "system:serviceaccount:vncgate:vncgate-relay"
    assert body["spec"]["resourceAttributes"] == {
        "namespace": "lab", "verb": "get", "group": "", "resource": "secrets", "name": "pw"}
