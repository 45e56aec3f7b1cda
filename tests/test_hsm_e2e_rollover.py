"""End to end, CA rollover with the CA key in SoftHSM: the tests of tests/test_e2e_rollover.py once more.

The real server (gunicorn, TLS on loopback) serves a ``pki_dir`` whose CA key was generated in a
SoftHSM token by `est-admin init --pkcs11-module ...`; `est-admin ca rollover` generates the new key
in the same token and signs the new root and both links there. Then, unchanged: curl, openssl and
strongSwan `pki --estca` read the four-certificate cacerts, openssl verifies old and new pumps, an
old-CA pump re-enrolls into a new-CA certificate, and FreeRADIUS accepts a pump of each CA and
refuses a revoked one of each (CRLs and OCSP answers signed in the token by each CA's own key).
"""

from __future__ import annotations

import pytest

from .test_e2e_rollover import (  # noqa: F401  (fixtures and tests, collected again here with the key in the token)
    rollover,
    rollovers,
    test_an_old_ca_pump_reenrolls_into_a_new_ca_certificate,
    test_cacerts_holds_both_cas_and_links_and_verifies_old_and_new_pumps,
    test_freeradius_accepts_a_pump_of_each_ca_and_refuses_a_revoked_one_of_each,
    test_strongswan_reads_the_four_certificate_cacerts,
)
from .test_hsm_e2e_revocation import pki_dir  # noqa: F401  (`est init`'s folder with the CA key in a SoftHSM token)

pytestmark = pytest.mark.e2e

