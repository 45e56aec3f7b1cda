"""Revocation: revoking certificates, deleting devices, and the CRLs every worker serves from its cache.

Each CA has its own CRL, listing exactly the revoked certificates it issued.
CRLs live in the store, numbered. A CA's CRL is re-signed on every revocation
of one of its certificates (by whichever process revoked) and when half its
lifetime has passed; each worker keeps the DER of the newest number it has
seen (read when the worker starts, and on each /crl or /readyz) and only
re-reads the store when that number moves. Nothing is rebuilt per request.
While the database is down a worker serves the CRL it holds, as it is.

A revocation marks itself unpublished in its own transaction, and the mark goes
only with the storing of a CRL that lists it. So when the re-sign after a
revocation fails (the CA key's token away, the process killed in between), the
CRL is stale, not forgotten: the next /crl request or /readyz probe, on any
worker or host, re-signs it; meanwhile /readyz and `est-admin doctor` say so.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone
from typing import Iterable, Optional

from sqlalchemy.exc import OperationalError, SQLAlchemyError

from ..ca import CertificateAuthority
from ..ca.crl import build_crl
from ..ca.signers import KeyUnavailable
from ..state import state
from ..store import AuditEvent, CertificateRecord, CRLRecord, Device, NotFound, Store, utcnow

# A deleted device is taken out of service: its certificates must stop opening the network.
DELETE_REASON = "cessationOfOperation"

log = logging.getLogger(__name__)


class CRLCache:
    """One CA's CRL. ``top_level``: the top-level CA, which also answers for records that name no issuer."""

    def __init__(self, authority: CertificateAuthority, store: Store, lifetime: timedelta, top_level: bool = False) -> None:
        self.authority = authority
        self.store = store
        self.lifetime = lifetime
        self._scope = (authority.issuer_id, top_level)
        self._lock = threading.Lock()
        try:  # held from the start, so this worker can serve it should the database be down at its first /crl
            self._current: Optional[CRLRecord] = store.current_crl(*self._scope)
        except SQLAlchemyError:  # down, or not migrated yet: the first /crl reads it
            self._current = None

    def regenerate(self, now: Optional[datetime] = None) -> CRLRecord:
        """Sign and store a new CRL of everything this CA has revoked now."""
        now = now or datetime.now(timezone.utc)
        # The revoked list is read after the number is chosen (see Store.save_crl).
        record = self.store.save_crl(
            lambda number: build_crl(self.authority, self.store.revoked_certificates(*self._scope), number, now, self.lifetime),
            *self._scope,
        )
        with self._lock:
            self._current = record
        return record

    def current(self, now: Optional[datetime] = None) -> CRLRecord:
        """The CA's newest CRL, re-signed first when none exists, half its lifetime has gone, or it lacks a revocation.

        With the database down, or the CA key's token away: the CRL this worker holds, however old
        (relying parties judge its nextUpdate); the error (a 503) only when it holds none.
        """
        try:
            return self._newest(now)
        except (OperationalError, KeyUnavailable) as exc:
            held = self._current
            if held is None:
                raise
            cause = "the database is unavailable" if isinstance(exc, OperationalError) else "the CA key cannot sign"
            log.warning("%s: serving the CRL held, number %s, next update %s", cause, held.number, held.next_update)
            return held

    def _newest(self, now: Optional[datetime]) -> CRLRecord:
        now = (now or datetime.now(timezone.utc)).replace(tzinfo=None)
        number = self.store.current_crl_number(*self._scope)
        cached = self._current
        if cached is None or cached.number != number:
            cached = self.store.current_crl(*self._scope) if number is not None else None
        due = cached is None or now >= cached.this_update + (cached.next_update - cached.this_update) / 2
        if due or self.unpublished_since() is not None:  # or it lacks a revocation whose own re-sign failed
            return self.regenerate()
        with self._lock:
            self._current = cached
        return cached

    def is_fresh(self, now: Optional[datetime] = None) -> bool:
        now = (now or datetime.now(timezone.utc)).replace(tzinfo=None)
        latest = self.store.current_crl(*self._scope)
        if latest is not None:
            with self._lock:  # the probe keeps what this worker would serve with the database down current
                self._current = latest
        return latest is not None and now < latest.next_update

    def unpublished_since(self) -> Optional[datetime]:
        """When the oldest revocation this CA's stored CRL lacks was made (its re-sign failed); None when it lists them all."""
        return self.store.unpublished_since(*self._scope)

    def resign_if_stale(self) -> Optional[datetime]:
        """Re-sign when the stored CRL lacks a revocation, as the next /crl request would; then :meth:`unpublished_since`."""
        if self.unpublished_since() is None:
            return None
        try:
            self.regenerate()
        except KeyUnavailable as exc:
            log.warning("the CRL of %s lacks a revocation and cannot be re-signed: the CA key %s (%s)", self.authority.name, exc.problem, exc.detail)
        return self.unpublished_since()


def revoke(serial: str, reason: str, actor: str, client_address: str = "") -> CertificateRecord:
    """Revoke ``serial`` (audited as ``actor``) and publish a new CRL of the CA that issued it.

    Every worker refuses the certificate from its next request on; raises the
    store's NotFound or AlreadyRevoked. The revocation stands when the CRL cannot
    be re-signed now: :func:`crl_not_renewed` says so.
    """
    app_state = state()
    store = app_state.store
    record = store.get_certificate(serial)
    if record is None:
        raise NotFound(serial)
    device = store.get_device(record.device_id) if record.device_id is not None else None
    audit = AuditEvent(
        "revoke", actor=actor, client_address=client_address, label=record.label,
        device=device.device_key if device else record.common_name, serial=serial, detail=reason,
    )
    revoked = store.revoke(serial, reason, audit)
    _publish_crls([revoked])
    return revoked


def live_certificates(device: Device) -> list[CertificateRecord]:
    """The device's certificates that still open the network: not revoked, not expired."""
    now = utcnow()
    return [c for c in state().store.device_certificates(device.id) if c.status != "revoked" and c.not_after > now]


def signing_authorities(records: Iterable[CertificateRecord]) -> list[CertificateAuthority]:
    """The configured CAs whose CRLs revoking ``records`` re-signs, each once."""
    found = {}
    for record in records:
        authority = state().authorities.issuer_of(record.issuer)
        if authority is not None:
            found[authority.issuer_id] = authority
    return list(found.values())


def crl_not_renewed() -> Optional[str]:
    """After a revocation: None when every CA's stored CRL lists all it revoked; otherwise one line for the operator."""
    app_state = state()
    stale = [authority.name for authority in app_state.authorities if app_state.crls[authority.issuer_id].unpublished_since()]
    if not stale:
        return None
    return (
        f"the CRL of {', '.join(stale)} could not be re-signed (see the log): it is marked stale, /readyz fails, "
        "and the next /crl request or `est-admin crl` re-signs it"
    )


def _publish_crls(records: Iterable[CertificateRecord]) -> None:
    """Re-sign the CRL of each CA that issued one of the just-revoked ``records``; a failure is logged, and the
    revocation's mark has the CRL re-signed later."""
    app_state = state()
    for record in records:
        if app_state.authorities.issuer_of(record.issuer) is None:
            # recorded all the same: OCSP and EST refuse it, and the CA's CRL lists it once configured again
            log.warning("revoked %s, issued by a CA no longer configured (%s): no CRL re-signed", record.serial, record.issuer)
    for authority in signing_authorities(records):
        # The revocation is committed whatever fails here: its mark keeps the CRL stale until one listing it is stored.
        try:
            app_state.crls[authority.issuer_id].regenerate()
        except KeyUnavailable as exc:
            log.warning("the CRL of %s is stale after a revocation: the CA key %s (%s)", authority.name, exc.problem, exc.detail)
        except Exception:
            log.warning("the CRL of %s is stale after a revocation: re-signing it failed", authority.name, exc_info=True)


def delete_device(device: Device, actor: str, client_address: str = "", *, keep_certificate: bool = False) -> Optional[Device]:
    """Forget ``device`` (audited as ``actor``); unless ``keep_certificate``, revoke every certificate
    of it that still opens the network (``cessationOfOperation``) in the same transaction and
    publish new CRLs.

    Returns the device as deleted, or None when it was gone already. A kept certificate
    stays valid until it expires but can no longer re-enroll (it belongs to no device).
    """
    app_state = state()
    kept = "kept valid at the operator's request" if keep_certificate else "revoked"
    audit = AuditEvent(
        "device-delete", actor=actor, client_address=client_address, label=device.label,
        device=device.device_key, serial=device.current_serial, detail=f"device {device.id}; its certificates {kept}",
    )
    live = [] if keep_certificate else live_certificates(device)
    deleted = app_state.store.delete_device(device.id, audit, None if keep_certificate else DELETE_REASON)
    if deleted is not None:
        _publish_crls(live)
    return deleted
