"""The one place that makes torchvision importable on a CPU-only torch.

PyPI's torchvision wheels are CUDA builds. Beside a CPU torch their C++ extension (`torchvision._C`)
fails to load, and `import torchvision` then dies in `_meta_registrations` with
"operator torchvision::nms does not exist". Declaring the schemas of the two operators that module
touches lets the pure-python parts (models, transforms.v2) import and work. Detection ops and
`decode_jpeg` stay unavailable, and masksiam does not use them.

A torch whose torchvision extension loads (CUDA machines) takes the first branch and nothing is
patched.
"""
from __future__ import annotations

import sys

_SHIM_LIBRARY = None  # keeps the torch.library registration alive for the whole process
TORCHVISION_EXTENSION_OK: bool | None = None


def _purge_partial_import() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision():
    """Import torchvision, declaring the missing operator schemas only if its extension failed."""
    global _SHIM_LIBRARY, TORCHVISION_EXTENSION_OK
    if "torchvision" in sys.modules and TORCHVISION_EXTENSION_OK is not None:
        return sys.modules["torchvision"]
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
