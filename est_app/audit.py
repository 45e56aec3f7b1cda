"""The audit trail: who did what, to which device and certificate, from where.

Successful changes are written in the same transaction as the change itself;
refusals are written on their own. Events never carry private keys or
passwords; ``detail`` holds the one-line reason given to the client.
"""

from __future__ import annotations

import getpass
import logging

from flask import g, request

from .state import state
from .store import MAX_USER_NAME, AuditEvent

log = logging.getLogger(__name__)

# EST operation -> audit event name
EVENTS = {
    "simpleenroll": "enroll",
    "simplereenroll": "reenroll",
    "serverkeygen": "keygen",
    "bootstrap": "bootstrap",
}


def request_event(event: str, outcome: str = "ok", *, device: str = "", serial: str = "", detail: str = "") -> AuditEvent:
    """An event about the current request: actor, address and label come from the request context."""
    identity = g.get("identity")
    profile = g.get("profile")
    return AuditEvent(
        event=event,
        outcome=outcome,
        actor=identity.requester if identity else "anonymous",
        client_address=request.remote_addr or "",
        label=profile.name if profile else "",
        device=device,
        serial=serial,
        detail=detail,
    )


def record_refusal(operation: str, status: int, message: str) -> None:
    """Write a refusal; a failure to write is logged, never turned into another error."""
    try:
        state().store.add_audit(request_event(EVENTS.get(operation, operation), "refused", detail=f"{status} {message}"))
    except Exception:
        log.exception("could not write the audit event for a refused %s", operation)


def clipped_name(name: str) -> str:
    """A user name as the trail records it: whole up to the store's limit, else clipped with a marker."""
    return name if len(name) <= MAX_USER_NAME else f"{name[:MAX_USER_NAME]}...[{len(name)} characters]"


def cli_actor() -> str:
    return f"cli:{getpass.getuser()}"
