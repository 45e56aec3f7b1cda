"""``POST bootstrap`` (non-standard, kept for existing gateways): HTTP Basic only.

Issues a short-lived clientAuth certificate (``bootstrap_validity_days``)
and, unless the label says otherwise, refuses a device enrolled already.
The label's policy still holds: a label that refuses passwords refuses
bootstrap, and proof-of-possession applies as for simpleenroll.
404 unless ``bootstrap_enabled``.
"""

from dataclasses import replace

from flask import Blueprint, g

from ..auth import basic, check_proof_of_possession, enrolling_identity
from ..encoding import ESTResponse
from ..errors import Forbidden, NotFound
from ..state import state
from .issuance import certs_only_response, read_csr, requester

bp = Blueprint("bootstrap", __name__)


@bp.post("/bootstrap")
@bp.post("/<label>/bootstrap")
@basic.login_required(optional=True)
def bootstrap() -> ESTResponse:
    settings = state().settings
    if not settings.bootstrap_enabled:
        raise NotFound("bootstrap is not enabled on this server (bootstrap_enabled: false)")
    if "basic" not in g.profile.auth:
        raise Forbidden(f"label {g.profile.name!r} does not accept passwords, and bootstrap takes HTTP Basic credentials")
    g.identity = identity = enrolling_identity(replace(g.profile, auth=frozenset({"basic"})))
    csr = read_csr()
    check_proof_of_possession(csr, identity, g.profile)
    certificate = state().enrollment.bootstrap(csr, g.profile, requester(identity), settings.bootstrap_validity_days)
    return certs_only_response(certificate, g.profile)
