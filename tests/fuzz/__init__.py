"""Coverage-guided fuzz harnesses (atheris) for every parser a client can reach; see README.md."""

import os
from pathlib import Path

HARNESSES = ("body", "csr", "csr_signed", "ocsp", "auth", "serverkeygen", "csrattrs")
FINDINGS = Path(__file__).parent / "findings"  # inputs that once failed: replayed as seeds, and tests/test_fuzz_regressions.py
WORK = Path(os.environ.get("EST_FUZZ_WORK", "/tmp/est-fuzz"))  # corpora, logs and new crash files
