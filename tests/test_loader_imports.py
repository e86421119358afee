"""The import guard of the optional loader libraries (tests/conftest.py): where the project installs
DALI and FFCV (CI=true, MASKSIAM_REQUIRE_LOADERS=1 from the Makefile) a library that does not import
fails the run; elsewhere its tests skip."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REQUIRE_LOADERS_ENV, have_loader_library, import_loader_library

MISSING = "masksiam_no_such_loader_library"   # a module name that never imports
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def optional(monkeypatch):
    """Neither variable set: the libraries are optional."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(REQUIRE_LOADERS_ENV, raising=False)
    return monkeypatch


@pytest.mark.parametrize("var, value", [(REQUIRE_LOADERS_ENV, "1"), ("CI", "true"), ("CI", "TRUE")])
def test_required_missing_library_raises(optional, var, value):
    optional.setenv(var, value)
    with pytest.raises(ImportError, match=f"{MISSING} does not import.*make install"):
        have_loader_library(MISSING)
    with pytest.raises(ImportError, match=MISSING):
        import_loader_library(MISSING)


@pytest.mark.parametrize("var, value", [(None, None), (REQUIRE_LOADERS_ENV, "0"), ("CI", "false"), ("CI", "")])
def test_optional_missing_library_skips(optional, var, value):
    if var:
        optional.setenv(var, value)
    assert have_loader_library(MISSING) is False
    with pytest.raises(pytest.skip.Exception, match=f"{MISSING} is not installed"):
        import_loader_library(MISSING)


def test_present_library_imports_either_way(optional):
    assert have_loader_library("json") is True
    optional.setenv(REQUIRE_LOADERS_ENV, "1")
    assert have_loader_library("json") is True
    assert import_loader_library("json") is sys.modules["json"]


def test_a_required_missing_library_fails_the_run(tmp_path):
    """End to end through pytest: a test module guarded like test_ffcv.py is a collection error (exit
    status 2, not 0) when required, and a skip (exit status 5: nothing ran) when not."""
    (tmp_path / "test_guarded.py").write_text(
        f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n"
        f"from conftest import import_loader_library\nimport_loader_library({MISSING!r})\n\n"
        "def test_uses_it():\n    pass\n")
    base = {k: v for k, v in os.environ.items() if k not in ("CI", REQUIRE_LOADERS_ENV)}

    def run(**env):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", "/dev/null",
                               "--rootdir", str(tmp_path), str(tmp_path / "test_guarded.py")],
                              capture_output=True, text=True, cwd=tmp_path, env={**base, **env}, timeout=120)

    required = run(**{REQUIRE_LOADERS_ENV: "1"})
    assert required.returncode == 2, required.stdout + required.stderr
    assert f"{MISSING} does not import" in required.stdout
    optional = run()
    assert optional.returncode == 5 and "1 skipped" in optional.stdout, optional.stdout + optional.stderr
