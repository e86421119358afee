"""Shared fixtures: small real-photo ImageFolders built at run time (nothing binary is committed)."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import masksiam  # noqa: F401  (torchvision shim before any test imports torchvision)

torch.set_num_threads(min(2, os.cpu_count() or 1))

# real photos that ship inside scikit-image's wheel (no network): RGB and grayscale
SKIMAGE_PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "retina", "hubble_deep_field",
                  "coins", "immunohistochemistry", "camera", "moon"]


# DALI and FFCV are optional for a user, but the project installs them (`make install`): where it did
# (CI, `make test`, `make test-fast`), a failed import is a broken install and must fail the suite
# instead of turning their tests into skips; elsewhere (a bare pip install) those tests skip.
REQUIRE_LOADERS_ENV = "MASKSIAM_REQUIRE_LOADERS"


def loader_libraries_required() -> bool:
    """True under CI=true (GitHub Actions and most CI set it) or MASKSIAM_REQUIRE_LOADERS=1 (the Makefile)."""
    return os.environ.get("CI", "").lower() == "true" or os.environ.get(REQUIRE_LOADERS_ENV, "") == "1"


def have_loader_library(name: str) -> bool:
    """Whether the optional loader library `name` (e.g. "nvidia.dali", "ffcv") imports: for skipif marks.

    Raises ImportError, naming the library and why, when it does not import and the project installed
    it (loader_libraries_required): a missing library is then an error at collection, not skips.
    """
    try:
        importlib.import_module(name)
    except ImportError as err:
        if loader_libraries_required():
            raise ImportError(f"{name} does not import but this test run requires it (CI=true or "
                              f"{REQUIRE_LOADERS_ENV}=1, set by `make test`): the install is broken, "
                              f"rerun `make install` ({type(err).__name__}: {err})") from err
        return False
    return True


def import_loader_library(name: str):
    """The module `name`, for a test module that needs it throughout: pytest.importorskip, except that
    the import failing is an error where the library is required (have_loader_library)."""
    if not have_loader_library(name):
        pytest.skip(f"{name} is not installed", allow_module_level=True)
    return importlib.import_module(name)


def resident_peak_ratio(script: str) -> float:
    """The last number `script` prints, run in a fresh interpreter (argv[1]: the repository root) whose
    malloc returns freed blocks to the system (a fixed mmap threshold, so a resident peak counts live
    bytes, not glibc's cached heap). Skips without Linux /proc (the scripts reset VmHWM there)."""
    import subprocess
    import sys
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to reset the resident peak")
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", script, root], capture_output=True, text=True,
                         timeout=120, cwd=root, env=env)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split()[-1])


def skimage_photos() -> list[np.ndarray]:
    from skimage import data
    out = []
    for name in SKIMAGE_PHOTOS:
        img = getattr(data, name)()
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        out.append(np.ascontiguousarray(img[..., :3]).astype(np.uint8))
    return out


def make_image_folder(root: Path, classes: int = 3, per_class: int = 8, seed: int = 0,
                      min_side: int = 64, max_side: int = 160, quality: int = 90) -> Path:
    """root/{train,val}/<class>/<i>.jpg: random crops of real photos at varied sizes and aspects.

    Class c draws from photo c (and c + classes, ...), so classes are visually distinct.
    """
    from PIL import Image
    photos = skimage_photos()
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", max(2, per_class // 4))):
        for c in range(classes):
            d = root / split / f"class_{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            src = [p for i, p in enumerate(photos) if i % classes == c]
            for i in range(n):
                photo = src[i % len(src)]
                h, w = photo.shape[:2]
                ch, cw = rng.integers(h // 3, h + 1), rng.integers(w // 3, w + 1)
                top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                crop = Image.fromarray(photo[top:top + ch, left:left + cw])
                out_w, out_h = rng.integers(min_side, max_side + 1, size=2)
                crop.resize((int(out_w), int(out_h)), Image.BILINEAR).save(d / f"{i:04d}.jpg", quality=quality)
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """3 classes x 8 train / 2 val JPEGs, 64-160 px: enough for loader contracts and short runs."""
    return make_image_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="session")
def pillow_test_images() -> Path:
    """Pillow's odd JPEG/PNG test images, fetched by `make install` (tools/fetch_testdata.sh)."""
    path = Path(__file__).resolve().parent.parent / ".cache" / "testdata" / "pillow"
    if not (path / ".complete").exists():
        pytest.skip("Pillow test images missing: run `make install` (tools/fetch_testdata.sh)")
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
