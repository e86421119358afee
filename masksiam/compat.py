"""The one place that makes torchvision importable on a CPU-only torch.

PyPI's torchvision wheels are CUDA builds. Beside a CPU torch their C++ extension (`torchvision._C`)
fails to load, and `import torchvision` then dies in `_meta_registrations` with
"operator torchvision::nms does not exist". Declaring the schemas of the two operators that module
touches lets the pure-python parts (models, transforms.v2) import and work. Detection ops and
`decode_jpeg` stay unavailable, and masksiam does not use them.

A torch whose torchvision extension loads (CUDA machines) takes the first branch of
`import_torchvision` and nothing is patched.

When it runs: the first `import torchvision` of a process goes through `import_torchvision`, by a
`sys.meta_path` finder (`TorchvisionImportHook`). `import masksiam` installs it, and so does every
interpreter start in the environment `make install` builds: `install_startup_hook` writes a `.pth`
file into its site-packages that imports masksiam (this module and masksiam/__init__.py import
nothing but the standard library, so a start-up that never imports torchvision pays ~nothing). A
user's own script that loads the exported backbone with torchvision thus works without importing
masksiam first.
"""
from __future__ import annotations

import sys

_SHIM_LIBRARY = None  # keeps the torch.library registration alive for the whole process
TORCHVISION_EXTENSION_OK: bool | None = None
STARTUP_FILE = "masksiam_torchvision.pth"   # sorts after setuptools' __editable__*.pth, which maps masksiam
# one line: site.py executes .pth lines that start with "import"; a removed masksiam leaves it inert
STARTUP_LINE = 'import importlib.util; importlib.util.find_spec("masksiam") and __import__("masksiam")\n'


def _purge_partial_import() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision():
    """Import torchvision, declaring the missing operator schemas only if its extension failed."""
    global _SHIM_LIBRARY, TORCHVISION_EXTENSION_OK
    if "torchvision" in sys.modules and TORCHVISION_EXTENSION_OK is not None:
        return sys.modules["torchvision"]
    remove_hook()           # the imports below are the real ones
    import torch

    try:
        import torchvision
        TORCHVISION_EXTENSION_OK = True
        return torchvision
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    _purge_partial_import()
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _SHIM_LIBRARY = lib
    import torchvision

    TORCHVISION_EXTENSION_OK = False
    return torchvision


class TorchvisionImportHook:
    """A meta-path finder for the name "torchvision" only: its loader's create_module runs
    import_torchvision (which removes this hook first) and hands the module it imported to the import
    system. find_spec itself imports nothing, so importlib.util.find_spec("torchvision") stays free of
    side effects."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                spec.loader = self   # same origin and search locations; this loader
                return spec
        return None

    def create_module(self, spec):
        module = import_torchvision()
        self._spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec   # module_from_spec set ours; the real one names the real loader


def install_hook() -> None:
    """Route the first `import torchvision` through import_torchvision (idempotent; nothing if imported)."""
    if "torchvision" in sys.modules or any(isinstance(f, TorchvisionImportHook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, TorchvisionImportHook())


def remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, TorchvisionImportHook)]


def install_startup_hook(site_dir: str | None = None):
    """Write STARTUP_FILE into this interpreter's site-packages (or `site_dir`): every later start of
    it installs the hook. Called by `make install`; returns the file's path."""
    import sysconfig
    from pathlib import Path

    from masksiam.io import atomic_write_text
    path = Path(site_dir or sysconfig.get_paths()["purelib"]) / STARTUP_FILE
    atomic_write_text(path, STARTUP_LINE)
    return path
