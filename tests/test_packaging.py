"""Packaging: install_requires against est_app's imports, the hash-pinned lock files, and the runtime set alone.

requirements.in names the runtime dependencies, setup.cfg's install_requires the
same ones; pip-compile turns requirements.in into requirements.txt (the
production venv) and requirements-dev.in into requirements-dev.txt (the runtime
pins plus the test tools). The end-to-end test installs requirements.txt and
est_app, nothing else, into a new virtualenv and enrolls through its est-server.
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import shutil
import sys
from pathlib import Path

import pytest
from cryptography import x509
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import PASSWORD, USER
from .e2e_clients import openssl, openssl_csr, run
from .server import REPO, start_server
from .test_e2e import enroll, issued

RUNTIME_LOCK = REPO / "requirements.txt"
DEV_LOCK = REPO / "requirements-dev.txt"
TEST_TOOLS = ("pytest", "selenium", "pkilint", "hypothesis", "atheris")


def setup_cfg_requirements(option: str) -> list[Requirement]:
    """The requirements an ``[options]`` list of setup.cfg holds (``install_requires``), or all its extras."""
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    if option == "extras_require":
        values = setup["options.extras_require"].values() if setup.has_section("options.extras_require") else []
    else:
        values = [setup["options"].get(option, "")]
    return [Requirement(line) for value in values for line in value.splitlines() if line.strip()]


def requirements_in(path: Path) -> list[Requirement]:
    """The requirements a pip-compile source file names (its -r and -c lines left out)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def lock_pins(path: Path) -> dict[str, tuple[str, list[str]]]:
    """``{name: (version, sha256 hashes)}`` of a file written by ``pip-compile --generate-hashes``."""
    pins = {}
    for line in path.read_text().replace("\\\n", " ").splitlines():
        requirement, *options = line.split("#", 1)[0].split() or [""]
        if requirement:
            name, pinned, version = requirement.partition("==")
            assert pinned and version, f"{path.name}: {requirement!r} is not pinned with =="
            pins[canonicalize_name(name)] = (version, [o for o in options if o.startswith("--hash=sha256:")])
    return pins


def names(requirements: list[Requirement]) -> set[str]:
    return {canonicalize_name(r.name) for r in requirements}


def imported_top_level_modules(package: Path) -> dict[str, Path]:
    """Every absolute import's top-level module in the package's .py files, with one file importing it."""
    modules: dict[str, Path] = {}
    for source in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found = [node.module]
            else:
                continue
            for name in found:
                modules.setdefault(name.partition(".")[0], source)
    return modules


def test_install_requires_names_every_distribution_est_app_imports():
    # An optional back end's imports (python-pkcs11 and asn1crypto for a CA key in a token) may come from an extra.
    declared = names(setup_cfg_requirements("install_requires")) | names(setup_cfg_requirements("extras_require"))
    providers = importlib.metadata.packages_distributions()
    imports = imported_top_level_modules(REPO / "est_app")
    third_party = {m: f for m, f in imports.items() if m not in sys.stdlib_module_names and m != "est_app"}
    assert {"flask", "limits", "pyasn1", "sqlalchemy"} <= third_party.keys()  # the walk sees the imports
    for module, source in sorted(third_party.items()):
        distributions = {canonicalize_name(d) for d in providers.get(module, [])}
        assert distributions, f"{source.relative_to(REPO)} imports {module}, which no installed distribution provides"
        assert distributions & declared, (
            f"{source.relative_to(REPO)} imports {module} (from {', '.join(sorted(distributions))}), "
            "which neither setup.cfg install_requires nor an extra names: add it there and to requirements.in"
        )


def test_requirements_in_and_install_requires_name_the_same_distributions():
    declared = names(setup_cfg_requirements("install_requires"))
    extras = names(setup_cfg_requirements("extras_require"))
    runtime = names(requirements_in(REPO / "requirements.in"))
    assert declared - runtime == set(), "in setup.cfg install_requires but not in requirements.in"
    assert runtime - declared - extras == set(), "in requirements.in but not in setup.cfg install_requires or extras"


def test_lock_files_pin_everything_with_hashes_and_agree():
    runtime, dev = lock_pins(RUNTIME_LOCK), lock_pins(DEV_LOCK)
    for path, pins in ((RUNTIME_LOCK, runtime), (DEV_LOCK, dev)):
        assert "pip-compile --allow-unsafe --generate-hashes" in path.read_text()[:500], f"{path.name}: header"
        assert [name for name, (_, hashes) in pins.items() if not hashes] == [], f"{path.name}: pins without hashes"
    # requirements.in and install_requires regenerated into requirements.txt (a missed pip-compile shows here)
    missing = names(requirements_in(REPO / "requirements.in")) - runtime.keys()
    assert missing == set(), "requirements.in names these, requirements.txt lacks them: rerun pip-compile"
    for requirement in setup_cfg_requirements("install_requires"):
        version = runtime[canonicalize_name(requirement.name)][0]
        assert requirement.specifier.contains(version), f"requirements.txt pins {requirement.name}=={version}"
    # the runtime set is only that; the dev set is the same pins plus the test tools
    assert runtime.keys() & {canonicalize_name(t) for t in TEST_TOOLS} == set()
    assert {name: dev.get(name) for name in runtime} == runtime, "requirements-dev.txt differs from requirements.txt"
    assert {canonicalize_name(t) for t in TEST_TOOLS} <= dev.keys()


@pytest.mark.e2e
def test_runtime_set_alone_serves_and_enrolls(tmp_path):
    venv, source = tmp_path / "venv", tmp_path / "est_app-src"
    python = venv / "bin" / "python"
    # A copy of the checkout, so pip's build leaves nothing in the working tree (build/, *.egg-info).
    junk = ("build", "dist", "instance", "test-artifacts", ".git", ".venv", "*.egg-info", "__pycache__", ".*_cache")
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*junk))
    run(sys.executable, "-m", "venv", venv)
    run(python, "-m", "pip", "install", "-q", "--require-hashes", "-r", RUNTIME_LOCK, timeout=300)
    run(python, "-m", "pip", "install", "-q", "--no-deps", source, timeout=300)

    run(python, "-m", "pip", "check")  # as docs/DEPLOYMENT.md has the operator do
    freeze = run(python, "-m", "pip", "freeze").stdout.decode().splitlines()
    assert names([Requirement(line) for line in freeze]) == lock_pins(RUNTIME_LOCK).keys() | {"est-app"}
    # -I: neither the current directory (the checkout) nor PYTHONPATH on sys.path
    probe = "import importlib.util as u, est_app; print(est_app.__file__); print([m for m in %r if u.find_spec(m)])"
    where, importable = run(python, "-I", "-c", probe % (TEST_TOOLS,)).stdout.decode().splitlines()
    assert where.startswith(str(venv)) and importable == "[]"

    pki_dir = tmp_path / "pki"
    run(venv / "bin" / "est-admin", "init", "--dir", pki_dir)
    config = pki_dir / "config.yaml"
    run(venv / "bin" / "est-admin", "--config", config, "user", "add", USER, input=f"{PASSWORD}\n".encode())
    server = start_server(pki_dir, tmp_path, venv=venv)
    try:
        csr = openssl_csr("ec", "NPPRUN1")
        cert = issued(enroll(server, openssl("base64", input=csr)), "base64", server.ca_file)
        assert cert.public_key() == x509.load_der_x509_csr(csr).public_key()
        assert server.alive()
    finally:
        server.stop()
