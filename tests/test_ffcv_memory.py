"""FFCV's memory managers over arrays against FFCV's own (tests/ffcv_memory_checks.py), run in a fresh
interpreter: comparing with FFCV's managers compiles their readers, and FFCV's `state_type` sets
`mutable = False` on numba's shared array types (uint8[::1]; uint64[::1] and uint32[::1] for the
process cache). Types whose key changes after they were hashed into numba's overload tables make
every later compile of a function taking them miss its cache and add an overload: in one pytest
process the FFCV kernels of the tests after these compiled for over ten minutes. Production loaders
use the array managers only, whose readers FFCV compiles as it always did."""
import os
import subprocess
import sys
from pathlib import Path

from conftest import have_loader_library

import pytest

pytestmark = pytest.mark.ffcv


@pytest.mark.skipif(not have_loader_library("ffcv"), reason="ffcv is not installed")
def test_array_managers_against_ffcvs_in_a_fresh_interpreter():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(root / "tests" / "ffcv_memory_checks.py")],
                         cwd=root, env=dict(os.environ), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    summary = out.stdout.strip().splitlines()[-1]                 # "13 passed, 1 warning in 25 s"
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
