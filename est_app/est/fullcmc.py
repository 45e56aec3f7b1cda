"""``POST fullcmc``: not offered; a clear 501 so clients fall back to simpleenroll."""

from flask import Blueprint

from ..errors import NotImplementedByServer

bp = Blueprint("fullcmc", __name__)


@bp.post("/fullcmc")
@bp.post("/<label>/fullcmc")
def fullcmc():
    raise NotImplementedByServer("fullcmc is not supported by this server; use simpleenroll")
