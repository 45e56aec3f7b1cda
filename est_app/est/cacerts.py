"""``GET cacerts``: the label's CA chain, self-signed root included, as certs-only PKCS#7. No auth."""

from flask import Blueprint, g

from ..encoding import PKCS7_MIME, ESTResponse
from ..state import state

bp = Blueprint("cacerts", __name__)


@bp.get("/cacerts")
@bp.get("/<label>/cacerts")
def cacerts() -> ESTResponse:
    return ESTResponse([(PKCS7_MIME, state().authority_for(g.profile).cacerts)])
