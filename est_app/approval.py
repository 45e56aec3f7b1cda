"""Manual approval (RFC 7030 4.2.3): the step before issuing that decides "issue now" or "wait".

A label's ``approval`` mode says who issues at once: everyone (``auto``), no one
(``manual``), or the devices in the asset inventory (``inventory``). Anyone else's
enrollment is recorded as a pending request, CSR kept as DER, and answered 202 with
``Retry-After``. The device's retries find its newest request on the label:

- pending, same CSR (public key and subject) and operation: 202 again;
- pending or approved, another CSR: it replaces the request, which waits again (audited);
- approved, same CSR: the enrollment service issues from the stored CSR, as it would have
  at once (a serverkeygen key is made now, never stored), and the request is collected;
- rejected, same CSR: 403 with the operator's reason;
- pending past ``approval.pending_hours`` (from filing), or approved and not collected within
  it (from the approval): marked expired, 403 saying so; the next try files anew. Operators'
  lists show such a request expired at once (:meth:`EnrollmentRequest.as_of`), before any try.

Operators decide with :meth:`ApprovalService.decide` (CLI, admin API, dashboard).
No Flask here: :class:`AwaitingApproval` is what the EST views turn into the 202.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar, Union

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .ca import check_policy, load_csr
from .config import DEFAULT_LABEL, ApprovalSettings, Settings
from .enrollment import EnrollmentService, Requester, device_key
from .errors import BadRequest, Conflict, Forbidden, NotFound
from .profiles import EnrollmentProfile
from .store import AuditEvent, Store
from .store.requests import (
    AlreadyDecided,
    EnrollmentRequest,
    RequestWriter,
    change_status,
    decide_request,
    get_request,
    in_inventory,
    list_requests,
    settle_request,
)

T = TypeVar("T")
MAX_REASON = 500


class AwaitingApproval(Exception):
    """Not an error: the request is recorded and waits for an operator (answered 202 + Retry-After)."""

    def __init__(self, request: EnrollmentRequest, retry_after: int) -> None:
        super().__init__(request.id)
        self.request = request
        self.retry_after = retry_after
        self.message = (
            f"enrollment request {request.id} for {request.device_key!r} is waiting for an operator's approval; "
            f"retry after {retry_after} seconds with the same CSR"
        )


@dataclass(frozen=True)
class _Collect:
    """Issue now from this approved request's stored CSR."""

    request: EnrollmentRequest


class ApprovalService:
    """Decides, before the enrollment service issues, whether a request issues now or waits."""

    def __init__(self, store: Store, settings: ApprovalSettings, enrollment: EnrollmentService) -> None:
        self.store = store
        self.settings = settings
        self.enrollment = enrollment  # asked first whether a request is a retry of one already answered

    def admit(
        self,
        csr: x509.CertificateSigningRequest,
        profile: EnrollmentProfile,
        requester: Requester,
        operation: str,
        issue: Callable[[x509.CertificateSigningRequest], T],
    ) -> T:
        """``issue(csr)`` when the label lets it through or an operator approved it; else raise AwaitingApproval or Forbidden."""
        if not self.applies(profile, operation):
            return issue(csr)
        check_policy(csr, profile.csr_policy)  # refused now, not after an operator spent time on it
        key = device_key(csr, profile.device_id)
        if profile.approval == "inventory" and in_inventory(self.store, profile.name, key):
            return issue(csr)
        if operation != "serverkeygen":  # its certificate holds the server's key: never a retry
            earlier = self.enrollment.already_issued(csr, profile, requester, operation)
            if earlier is not None:
                return earlier  # type: ignore[return-value]  (simpleenroll and simplereenroll issue certificates)
        values = {
            "label": profile.name, "device_key": key, "csr": csr.public_bytes(Encoding.DER), "public_key_hash": public_key_hash(csr),
            "subject": csr.subject.rfc4514_string(), "operation": operation, "requester": requester.name,
            "client_address": requester.client_address,
        }
        # Refusals and 202s are returned out of the transaction, not raised in it: what it wrote must commit.
        decision = settle_request(self.store, profile.name, key, lambda newest, writer: self._settle(newest, writer, values, requester))
        if isinstance(decision, Exception):
            raise decision
        request = decision.request
        if not change_status(self.store, request.id, "approved", "collected"):
            raise Conflict(f"enrollment request {request.id} is being collected by another try; retry in a few seconds")
        try:
            result = issue(load_csr(request.csr))
        except BaseException:
            change_status(self.store, request.id, "collected", "approved")  # not issued: the next try collects it
            raise
        self.store.add_audit(self._event("request-collect", requester, request, f"request {request.id} collected"))
        return result

    def applies(self, profile: EnrollmentProfile, operation: str) -> bool:
        if profile.approval == "auto":
            return False
        return operation != "simplereenroll" or profile.approve_reenrollment

    def _settle(
        self, newest: Optional[EnrollmentRequest], writer: RequestWriter, values: dict, requester: Requester
    ) -> Union[_Collect, AwaitingApproval, Forbidden]:
        same = newest is not None and (newest.public_key_hash, newest.subject, newest.operation) == (
            values["public_key_hash"], values["subject"], values["operation"]
        )
        hours = self.settings.pending_hours
        if newest is not None and newest.as_of(hours).status == "expired" and newest.status != "expired":
            if newest.status == "pending":
                detail, message = "no decision in time", f"expired after {hours} hours without an operator's decision"
            else:
                detail = "approved, not collected in time"
                message = f"was approved but expired: not collected within {hours} hours of the approval"
            writer.set_status(newest.id, "expired", self._event("request-expire", requester, newest, detail))
            return Forbidden(f"enrollment request {newest.id} {message}; enroll again to file a new request")
        if newest is not None and newest.status == "rejected" and same:
            by = f" by {newest.decided_by}" if newest.decided_by else ""
            return Forbidden(f"enrollment request {newest.id} was rejected{by}: {newest.reason or 'no reason given'}")
        if newest is not None and newest.status == "approved" and same:
            return _Collect(newest)
        if newest is not None and newest.status == "pending" and same:
            return AwaitingApproval(newest, self.settings.retry_after_seconds)
        if newest is not None and newest.status in ("pending", "approved"):
            detail = f"request {newest.id}: CSR replaced (was {newest.subject}, key {newest.public_key_hash[:16]}); waits again"
            request = writer.replace(newest.id, values, self._event("request-replace", requester, newest, detail))
        else:
            request = writer.add(values, lambda r: self._event("request", requester, r, f"request {r.id} ({r.operation}) waits for approval"))
        return AwaitingApproval(request, self.settings.retry_after_seconds)

    # --- operators -------------------------------------------------------------------

    def decide(self, request_id: int, approve: bool, operator: str, reason: str = "", client_address: str = "") -> EnrollmentRequest:
        """Approve or reject a pending request as ``operator`` (audited with their name)."""
        reason = " ".join(reason.split())
        if not approve and not reason:
            raise BadRequest("a rejection needs a reason: the device's next try is answered with it")
        if len(reason) > MAX_REASON:
            raise BadRequest(f"reason longer than {MAX_REASON} characters")
        request = self.find(request_id)
        verb = "approve" if approve else "reject"
        audit = AuditEvent(
            event=f"request-{verb}", actor=operator, client_address=client_address, label=request.label, device=request.device_key,
            detail=f"request {request_id} {verb}d" + (f": {reason}" if reason else ""),
        )
        try:
            return decide_request(self.store, request_id, approve, operator, reason, audit, self.settings.pending_hours)
        except AlreadyDecided as exc:
            raise Conflict(f"enrollment request {request_id} is {exc.request.status} already; only a pending request can be decided") from None

    def find(self, request_id: int) -> EnrollmentRequest:
        """The request as it stands now (expired once past ``pending_hours``, before any device's try records it)."""
        request = get_request(self.store, request_id)
        if request is None:
            raise NotFound(f"no enrollment request {request_id}")
        return request.as_of(self.settings.pending_hours)

    def requests(self, status: Optional[str] = "pending") -> list[EnrollmentRequest]:
        """Requests as they stand now, oldest first (``status`` None: every status)."""
        return list_requests(self.store, status, self.settings.pending_hours)

    @staticmethod
    def _event(event: str, requester: Requester, request: EnrollmentRequest, detail: str) -> AuditEvent:
        return AuditEvent(
            event=event, actor=requester.name, client_address=requester.client_address, label=request.label,
            device=request.device_key, detail=detail,
        )


def inventory_label(settings: Settings, label: object) -> str:
    """``label`` if the configuration has it (or it is the unlabelled path's name): an inventory is per label."""
    if label != DEFAULT_LABEL and label not in settings.labels:
        raise BadRequest(f"no label {label!r} in the configuration")
    return str(label)


def public_key_hash(csr: x509.CertificateSigningRequest) -> str:
    """SHA-256 of the CSR's SubjectPublicKeyInfo, hex: what tells a retry from another CSR."""
    return hashlib.sha256(csr.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).hexdigest()
