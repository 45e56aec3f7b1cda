"""The EST blueprint: ``/.well-known/est/[<label>/]<op>``, one child blueprint per operation.

Here, once for every operation: the label is resolved to its enrollment
profile (404 for an unknown one), and after the view the profile's response
encoding renders the body.
"""

from __future__ import annotations

from flask import Blueprint, Response, g, request

from ..approval import AwaitingApproval
from ..audit import EVENTS, record_refusal
from ..encoding import waiting_for_approval
from ..errors import ESTError, NotFound, text_error
from ..state import state
from . import bootstrap, cacerts, csrattrs, fullcmc, serverkeygen, simpleenroll, simplereenroll

bp = Blueprint("est", __name__, url_prefix="/.well-known/est")
for child in (cacerts, simpleenroll, simplereenroll, serverkeygen, csrattrs, fullcmc, bootstrap):
    bp.register_blueprint(child.bp)


@bp.url_value_preprocessor
def _resolve_label(endpoint, values) -> None:
    label = (values or {}).pop("label", None)
    profile = state().profiles.get(label)
    if profile is None:
        raise NotFound(f"unknown EST label {label!r}: check the URL the client was given")
    g.profile = profile


@bp.errorhandler(ESTError)
def _refused(exc: ESTError) -> Response:
    operation = (request.endpoint or "").split(".")[1] if request.endpoint else ""
    # A 429 is a back-off already audited once when it began: a row per throttled request
    # would let a flood of bogus credentials fill the trail and queue on the write lock.
    if operation in EVENTS and exc.status != 429:
        identity, profile = g.get("identity"), g.get("profile")
        record_refusal(
            state().store, operation, exc.status, exc.message,
            actor=identity.requester if identity else "anonymous", client_address=request.remote_addr or "",
            label=profile.name if profile else "",
        )
    return text_error(exc)


@bp.errorhandler(AwaitingApproval)
def _waiting(waiting: AwaitingApproval) -> Response:
    return waiting_for_approval(waiting.message, waiting.retry_after)


@bp.after_request
def _encode(response: Response) -> Response:
    profile = g.get("profile") or state().profiles[None]
    profile.encoding.apply(response)
    return response
