"""The audit trail: who did what, to which device and certificate, from where.

Successful changes are written in the same transaction as the change itself;
refusals are written on their own. Events never carry private keys or
passwords; ``detail`` holds the one-line reason given to the client. Events
are built from plain values (who, from where, on which label), never from a
request context: the enrollment service writes its own in its transactions.
"""

from __future__ import annotations

import getpass
import logging

from .store import MAX_USER_NAME, AuditEvent, Store

log = logging.getLogger(__name__)

# EST operation -> audit event name
EVENTS = {
    "simpleenroll": "enroll",
    "simplereenroll": "reenroll",
    "serverkeygen": "keygen",
    "bootstrap": "bootstrap",
}
RETRY = "retry"  # a request sent again after its response was lost, answered with the certificate already issued


def record_refusal(store: Store, operation: str, status: int, message: str, *, actor: str, client_address: str, label: str) -> None:
    """Write that ``operation`` was refused; a failure to write is logged, never turned into another error."""
    event = AuditEvent(
        event=EVENTS.get(operation, operation), outcome="refused", actor=actor, client_address=client_address, label=label,
        detail=f"{status} {message}",
    )
    try:
        store.add_audit(event)
    except Exception:
        log.exception("could not write the audit event for a refused %s", operation)


def clipped_name(name: str) -> str:
    """A user name as the trail records it: whole up to the store's limit, else clipped with a marker."""
    return name if len(name) <= MAX_USER_NAME else f"{name[:MAX_USER_NAME]}...[{len(name)} characters]"


def cli_actor() -> str:
    return f"cli:{getpass.getuser()}"
