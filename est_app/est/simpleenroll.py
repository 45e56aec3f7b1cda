"""``POST simpleenroll``: a user or RA sends a CSR and gets the device's certificate."""

from flask import Blueprint, g

from ..auth import check_proof_of_possession, enroller_required
from ..encoding import ESTResponse
from ..state import state
from .issuance import certs_only_response, read_csr, requester

bp = Blueprint("simpleenroll", __name__)


@bp.post("/simpleenroll")
@bp.post("/<label>/simpleenroll")
@enroller_required
def simpleenroll() -> ESTResponse:
    csr = read_csr()
    check_proof_of_possession(csr, g.identity, g.profile)
    asking = requester(g.identity)
    certificate = state().approval.admit(
        csr, g.profile, asking, "simpleenroll", lambda approved: state().enrollment.enroll(approved, g.profile, asking)
    )
    return certs_only_response(certificate, g.profile)
