"""``POST simpleenroll``: an authenticated user sends a CSR and gets its certificate."""

from flask import Blueprint, g

from ..auth import basic
from ..encoding import CERTS_ONLY, ESTResponse
from ..state import state
from .issuance import issue_and_record, read_csr

bp = Blueprint("simpleenroll", __name__)


@bp.post("/simpleenroll")
@bp.post("/<label>/simpleenroll")
@basic.login_required
def simpleenroll() -> ESTResponse:
    csr = read_csr(g.profile)
    certificate = issue_and_record(csr, g.profile, requester=basic.current_user().name)
    return ESTResponse([(CERTS_ONLY, state().authority.certs_only(certificate, g.profile.certificate))])
