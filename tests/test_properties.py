"""Property test through the test client: no request, however formed, gets a 5xx.

Hypothesis generates bodies (random bytes, valid CSRs in every body form,
CSRs with a byte changed or cut short, text), the headers a client controls
(Content-Type, Content-Transfer-Encoding, Authorization: good, an admin's,
good with characters inserted, malformed, random), label paths, ids and serials in paths, query strings and
methods, and sends them to every EST, OCSP, CRL, health, metrics, admin API
and dashboard route of one app. No answer may be a 5xx, EST refusals are one
``text/plain`` line, and afterwards a good enrollment still works.

``OPTIONS`` is answered as RFC 9110 9.3.7 has it, by Flask: 200, an ``Allow``
header, no body, no credentials asked (it issues nothing and says no more than
a 405 would). Unknown labels are still 404, and the admin network gate applies.

CI draws the same examples every run (``derandomize``): a failure there is a
change in the code, not a new draw. ``EST_PROPERTY_EXAMPLES`` sets how many
requests (default 1000, some seconds of CI time); setting it, for a longer
local run, also draws fresh examples each run.
"""

from __future__ import annotations

import base64
import os
import urllib.parse

from cryptography.hazmat.primitives.serialization import pkcs7
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import PASSWORD, basic_auth, run_cli
from .fuzz.deployment import body_forms, header_text
from .pki import der, make_csr

PROFILE = settings(
    max_examples=int(os.environ.get("EST_PROPERTY_EXAMPLES", "1000")),
    derandomize="EST_PROPERTY_EXAMPLES" not in os.environ,
    deadline=None,  # the machine is shared; an example's time is not the property
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
ADMIN = "operator"
LABELS = {
    "pumps": {"auth": ["basic", "cert"], "response_format": "der"},
    "strict": {"require_csr_attributes": True, "csr_attributes": ["serialNumber"]},
    "certonly": {"auth": ["cert"]},
}
CSR_FORMS = body_forms(der(make_csr("NPPPROP1")))
EST_OPERATIONS = ("cacerts", "simpleenroll", "simplereenroll", "serverkeygen", "csrattrs", "fullcmc", "bootstrap", "nope")
FIXED_PATHS = (
    "/ocsp", "/crl", "/crl.pem", "/healthz", "/readyz", "/metrics", "/", "/admin/", "/admin/login", "/admin/logout",
    "/admin/devices", "/api/v1/devices", "/api/v1/certificates", "/api/v1/statistics",
)
TEMPLATED_PATHS = (
    "/ocsp/{}", "/api/v1/devices/{}", "/api/v1/devices/{}/revoke", "/api/v1/certificates/{}", "/api/v1/certificates/{}/revoke",
    "/admin/devices/{}", "/admin/devices/{}/revoke", "/admin/devices/{}/delete",
)


def changed(body: bytes, position: int, value: int) -> bytes:
    position %= len(body)
    return body[:position] + bytes([value]) + body[position + 1 :]


segments = st.one_of(st.integers(-3, 2**70).map(str), st.sampled_from(["1", "0", "abc", "..", "%", "MA=="]), st.text(max_size=30))
labels = st.one_of(st.none(), st.sampled_from(["pumps", "strict", "certonly", "unknown", "cacerts"]), st.text(min_size=1, max_size=20))
est_paths = st.builds(
    lambda label, operation: f"/.well-known/est/{label}/{operation}" if label is not None else f"/.well-known/est/{operation}",
    labels, st.sampled_from(EST_OPERATIONS),
)
other_paths = st.one_of(st.sampled_from(FIXED_PATHS), st.builds(lambda template, value: template.format(value), st.sampled_from(TEMPLATED_PATHS), segments))
queries = st.dictionaries(
    st.sampled_from(["search", "status", "label", "limit", "after", "expiring", "q", "next", "serial"]), st.text(max_size=20), max_size=3
).map(urllib.parse.urlencode)
bodies = st.one_of(
    st.binary(max_size=400),
    st.sampled_from(CSR_FORMS),
    st.builds(changed, st.sampled_from(CSR_FORMS), st.integers(0, 10_000), st.integers(0, 255)),
    st.builds(lambda body, cut: body[:cut], st.sampled_from(CSR_FORMS), st.integers(0, 600)),
    st.text(max_size=200).map(str.encode),
    st.sampled_from([b'{"reason": "keyCompromise"}', b"{", b"[]", b"reason=superseded&csrf=x", b"username=operator&password=x"]),
)
header_values = st.one_of(st.text(st.characters(max_codepoint=0x2FF), max_size=60).map(lambda t: header_text(t.encode("latin-1", "replace"))),
                          st.binary(max_size=60).map(header_text))
content_types = st.one_of(
    st.none(),
    st.sampled_from(["application/pkcs10", "application/pkcs10; charset=x", "application/ocsp-request", "application/json",
                     "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain", ""]),
    header_values,
)
transfer_encodings = st.one_of(st.none(), st.sampled_from(["base64", "BASE64", "binary", "7bit", ""]), header_values)
GOOD_TOKEN = basic_auth()["Authorization"].removeprefix("Basic ")
authorizations = st.one_of(
    st.none(),
    st.sampled_from(["good", "admin", "Basic", "Basic !!!", "Bearer x", "Digest username=x"]),
    st.binary(max_size=40).map(lambda raw: "Basic " + base64.b64encode(raw).decode()),
    st.builds(lambda at, extra: f"Basic {GOOD_TOKEN[:at]}{extra}{GOOD_TOKEN[at:]}", st.integers(0, len(GOOD_TOKEN)), header_values),
    header_values.map("Basic {}".format),
    header_values,
)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])


def credentials(choice: str | None) -> str | None:
    if choice == "good":
        return basic_auth()["Authorization"]
    if choice == "admin":
        return basic_auth(ADMIN, PASSWORD)["Authorization"]
    return choice


@PROFILE
@given(st.data())
def _no_server_errors(client, data) -> None:
    path = data.draw(st.one_of(est_paths, other_paths), label="path")
    query = data.draw(queries, label="query")
    headers = {
        name: value
        for name, value in (
            ("Content-Type", data.draw(content_types, label="Content-Type")),
            ("Content-Transfer-Encoding", data.draw(transfer_encodings, label="Content-Transfer-Encoding")),
            ("Authorization", credentials(data.draw(authorizations, label="Authorization"))),
        )
        if value is not None
    }
    method = data.draw(methods, label="method")
    body = data.draw(bodies, label="body")
    url = urllib.parse.quote(path, safe="/%") + (f"?{query}" if query else "")
    response = client.open(url, method=method, data=body, headers=headers)
    fullcmc = response.status_code == 501 and path.endswith("/fullcmc")  # the one 5xx by design (RFC 7030 4.3)
    assert response.status_code < 500 or fullcmc, (response.status_code, response.get_data()[:300])
    if path in ("/.well-known/est/certonly/simpleenroll", "/.well-known/est/certonly/serverkeygen") and "Authorization" in headers:
        issued = response.status_code == 200 and method != "OPTIONS"  # OPTIONS: Allow, no body (test below)
        assert not issued, "a password got past a label that takes only certificates"
    if path.startswith("/.well-known/est/") and response.status_code >= 400 and method != "HEAD":
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert response.get_data().count(b"\n") == 1, response.get_data()


def test_options_on_an_est_route_lists_the_methods_and_issues_nothing(make_app):
    # hypothesis drew this once: OPTIONS with a good password on a label that takes only certificates.
    app = make_app(labels=LABELS)
    client = app.test_client()
    response = client.options("/.well-known/est/certonly/simpleenroll", data=der(make_csr("NPPOPT1")),
                              headers={"Content-Type": "application/pkcs10", **basic_auth()})
    assert (response.status_code, response.get_data()) == (200, b"")
    assert set(response.headers["Allow"].split(", ")) == {"OPTIONS", "POST"}
    assert app.extensions["est_app"].store.count_certificates() == 0
    assert client.options("/.well-known/est/unknown/simpleenroll").status_code == 404
    assert client.options("/api/v1/devices", environ_base={"REMOTE_ADDR": "10.1.2.3"}).status_code == 403


def test_no_request_gets_a_server_error_and_enrollment_still_works(make_app, tmp_path):
    app = make_app(labels=LABELS)
    result = run_cli("user", "add", "--admin", ADMIN, input=PASSWORD + "\n", config=tmp_path / "config.yaml")
    assert result.exit_code == 0, result.output
    client = app.test_client()
    _no_server_errors(client)
    # From another address: the generated wrong passwords may well have put 127.0.0.1 into back-off.
    response = client.post(
        "/.well-known/est/simpleenroll", data=der(make_csr("NPPAFTER")), headers={"Content-Type": "application/pkcs10", **basic_auth()},
        environ_base={"REMOTE_ADDR": "127.0.0.42"},
    )
    assert response.status_code == 200, response.get_data()
    (certificate,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.get_data()))
    assert certificate.subject.rfc4514_string() == "CN=NPPAFTER"
