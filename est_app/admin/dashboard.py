"""The dashboard under ``/admin``."""

from flask import Blueprint

from . import check_network

bp = Blueprint("dashboard", __name__, url_prefix="/admin")
bp.before_request(check_network)
