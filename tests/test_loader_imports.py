"""The import guard of the optional loader libraries (tests/conftest.py): where the project installs
DALI and FFCV (CI=true, MASKSIAM_REQUIRE_LOADERS=1 from the Makefile) a library that does not import
fails the run; elsewhere its tests skip."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REQUIRE_LOADERS_ENV, have_loader_library, import_loader_library, loader_libraries_required

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


# ---- torchvision in the project's environment, without masksiam imported first (masksiam/compat.py) --

def _fresh(code: str, tmp_path) -> subprocess.CompletedProcess:
    """`code` in a new interpreter of this environment, outside the repository, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)


def _startup_file_installed() -> bool:
    import sysconfig
    from masksiam.compat import STARTUP_FILE
    return (Path(sysconfig.get_paths()["purelib"]) / STARTUP_FILE).is_file()


def test_torchvision_imports_in_a_fresh_interpreter(tmp_path):
    """What a user's own script does with the exported backbone: import torchvision first, build a
    ResNet, run it. On CPU torch the registry's CUDA torchvision needs the shim, which the start-up
    hook `make install` writes applies; where the extension loads (CUDA) nothing is patched."""
    r = _fresh("import torch, torchvision\n"
               "out = torchvision.models.resnet18().eval()(torch.zeros(1, 3, 32, 32))\n"
               "import masksiam.compat as c\n"
               "print(tuple(out.shape), c.TORCHVISION_EXTENSION_OK)", tmp_path)
    if r.returncode and not _startup_file_installed() and not loader_libraries_required():
        pytest.skip("the torchvision start-up hook is not installed here (run `make install`)")
    assert r.returncode == 0, r.stderr[-2000:]
    shape, native = r.stdout.split(")")[0] + ")", r.stdout.split(")")[1].strip()
    assert shape == "(1, 1000)"
    import torchvision  # noqa: F401  (this process: conftest imported masksiam first)
    from masksiam import compat
    assert native == str(compat.TORCHVISION_EXTENSION_OK)   # the same verdict as masksiam's own import


def test_startup_hook_imports_no_torch(tmp_path):
    """The hook runs at every interpreter start: it must not import torch (seconds) until torchvision
    is imported, and importlib.util.find_spec("torchvision") must not import it either."""
    r = _fresh("import sys, importlib.util\n"
               "before = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'numpy'))\n"
               "import masksiam\n"
               "spec = importlib.util.find_spec('torchvision')\n"
               "after = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'numpy'))\n"
               "print(before, after, spec.origin.endswith('__init__.py'))", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["[]", "[]", "True"]


def test_masksiam_first_then_torchvision_submodule(tmp_path):
    """`import masksiam` then a torchvision sub-module as the first torchvision import (what
    models/ and pipelines/ do): one import, the real spec, the hook gone afterwards."""
    r = _fresh("import sys, masksiam\n"
               "from torchvision.transforms import v2\n"
               "import torchvision\n"
               "from masksiam.compat import TorchvisionImportHook\n"
               "print(type(torchvision.__spec__.loader).__name__, "
               "any(isinstance(f, TorchvisionImportHook) for f in sys.meta_path), v2.RandomResizedCrop.__name__)",
               tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["SourceFileLoader", "False", "RandomResizedCrop"]


def test_install_startup_hook_writes_one_import_line(tmp_path):
    from masksiam.compat import STARTUP_FILE, install_startup_hook
    path = install_startup_hook(str(tmp_path))
    assert path == tmp_path / STARTUP_FILE
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("import ")     # site.py executes only such lines
