"""Admin API routes (on the ``/api/v1`` blueprint) for enrollment requests waiting for approval and the asset inventory.

Decisions are audited with the admin's name (``admin:NAME``); errors are the API's JSON shape.
"""

from __future__ import annotations

from flask import Response, request

from ..approval import inventory_label
from ..config import DEFAULT_LABEL
from ..errors import BadRequest, NotFound
from ..records import inventory_json, request_json
from ..state import state
from ..store import AuditEvent
from ..store.requests import REQUEST_STATUSES, add_to_inventory, list_inventory, remove_from_inventory
from . import api_admin_required
from .api import _actor, bp, json_object, json_response, query_params

MAX_INVENTORY_ADD = 10000


@bp.get("/requests")
@api_admin_required
def list_enrollment_requests() -> Response:
    status = query_params(("status",)).get("status", "pending")
    if status not in (*REQUEST_STATUSES, "all"):
        raise BadRequest(f"status must be one of {', '.join(REQUEST_STATUSES)} or all, not {status!r}")
    requests = state().approval.requests(None if status == "all" else status)
    return json_response({"items": [request_json(r, _hours()) for r in requests]})


@bp.get("/requests/<int:request_id>")
@api_admin_required
def show_enrollment_request(request_id: int) -> Response:
    return json_response(request_json(state().approval.find(request_id), _hours(), with_csr=True))


@bp.post("/requests/<int:request_id>/approve")
@api_admin_required
def approve_enrollment_request(request_id: int) -> Response:
    json_object((), "{}")
    decided = state().approval.decide(request_id, True, _actor(), client_address=request.remote_addr or "")
    return json_response(request_json(decided, _hours()))


@bp.post("/requests/<int:request_id>/reject")
@api_admin_required
def reject_enrollment_request(request_id: int) -> Response:
    reason = json_object(("reason",), '{"reason": "not in the asset list"}').get("reason", "")
    if not isinstance(reason, str):
        raise BadRequest("reason must be text")
    decided = state().approval.decide(request_id, False, _actor(), reason, request.remote_addr or "")
    return json_response(request_json(decided, _hours()))


def _hours() -> int:
    return state().approval.settings.pending_hours


@bp.get("/inventory")
@api_admin_required
def list_inventory_entries() -> Response:
    label = query_params(("label",)).get("label") or None
    return json_response({"items": [inventory_json(e) for e in list_inventory(state().store, label)]})


@bp.post("/inventory")
@api_admin_required
def add_inventory_entries() -> Response:
    body = json_object(("label", "devices"), '{"label": "pumps", "devices": ["NPPBBB4"]}')
    label = inventory_label(state().settings, body.get("label", DEFAULT_LABEL))
    devices = body.get("devices")
    if not isinstance(devices, list) or not devices or not all(isinstance(d, str) and d.strip() for d in devices):
        raise BadRequest("devices must be a non-empty list of device ids (text)")
    if len(devices) > MAX_INVENTORY_ADD:
        raise BadRequest(f"at most {MAX_INVENTORY_ADD} devices a request; send the rest in another")
    keys = [d.strip() for d in devices]
    audit = AuditEvent(event="inventory-add", actor=_actor(), client_address=request.remote_addr or "", label=label, detail=f"{len(keys)} device id(s)")
    added = add_to_inventory(state().store, label, keys, _actor(), audit)
    return json_response({"label": label, "added": added, "listed_already": len(set(keys)) - added})


@bp.delete("/inventory/<label>/<device>")
@api_admin_required
def remove_inventory_entry(label: str, device: str) -> Response:
    audit = AuditEvent(event="inventory-remove", actor=_actor(), client_address=request.remote_addr or "", label=label, device=device)
    if not remove_from_inventory(state().store, label, device, audit):
        raise NotFound(f"{device!r} is not in the inventory of label {label}")
    response = Response(status=204)
    response.headers.pop("Content-Type", None)
    return response
