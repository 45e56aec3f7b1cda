"""End to end with the CA key in SoftHSM: CRL and OCSP with openssl, and FreeRADIUS with eapol_test.

The revocation tests of tests/test_e2e_revocation.py run here once more, unchanged, on a ``pki_dir``
whose CA key was generated inside a SoftHSM token (tests/softhsm.py): every CRL and OCSP response
they check was signed in the token.
"""

from __future__ import annotations

import pytest

from .softhsm import token_pki_dir
from .test_e2e_revocation import (  # noqa: F401  (fixtures and tests, collected again here with the key in the token)
    server,
    servers,
    test_freeradius_refuses_a_revoked_pump_by_crl,
    test_freeradius_refuses_a_revoked_pump_by_ocsp_at_once,
    test_revoked_pump_fails_crl_and_ocsp_checks_and_cannot_reenroll,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory):
    """`est init`'s folder with the CA key in a SoftHSM token, for every test of this module."""
    return token_pki_dir(tmp_path_factory.mktemp("hsm-pki"))[0]
