"""``POST simpleenroll``: a user or RA sends a CSR and gets the device's certificate."""

from flask import Blueprint, g

from ..auth import check_proof_of_possession, enroller_required
from ..encoding import ESTResponse
from .issuance import certs_only_response, issue_for_device, read_csr

bp = Blueprint("simpleenroll", __name__)


@bp.post("/simpleenroll")
@bp.post("/<label>/simpleenroll")
@enroller_required
def simpleenroll() -> ESTResponse:
    csr = read_csr(g.profile)
    check_proof_of_possession(csr, g.identity, g.profile)
    certificate = issue_for_device(csr, g.profile, g.identity, "simpleenroll")
    return certs_only_response(certificate, g.profile)
