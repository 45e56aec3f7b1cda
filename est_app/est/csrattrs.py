"""``GET csrattrs``: what the label wants in a CSR, as DER ``CsrAttrs`` (RFC 7030 4.5); 204 when nothing."""

from flask import Blueprint, Response, g
from pyasn1.codec.der import encoder
from pyasn1.type import univ
from pyasn1_modules import rfc7030

from ..encoding import CSRATTRS, ESTResponse

bp = Blueprint("csrattrs", __name__)


@bp.get("/csrattrs")
@bp.get("/<label>/csrattrs")
def csrattrs() -> Response:
    oids = g.profile.csr_policy.attributes
    if not oids:
        response = Response(status=204)
        del response.headers["Content-Type"]
        return response
    attrs = rfc7030.CsrAttrs()
    for i, oid in enumerate(oids):
        entry = rfc7030.AttrOrOID()
        entry["oid"] = univ.ObjectIdentifier(oid.dotted_string)
        attrs[i] = entry
    return ESTResponse([(CSRATTRS, encoder.encode(attrs))])
