"""The admin JSON API under ``/api/v1``."""

from flask import Blueprint

from . import check_network

bp = Blueprint("api", __name__, url_prefix="/api/v1")
bp.before_request(check_network)
