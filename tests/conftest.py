"""Shared pytest configuration.

Markers:
  gpu   -- needs a CUDA device; skipped with a reason when none is present.
  slow  -- too slow for the default CPU run; enabled with ``--runslow``.
"""
import os
import types

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when no GPU is present.
# It must be set before triton is first imported, so it is set here, at the
# top of the first module pytest loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
    config.addinivalue_line("markers", "slow: slow on a 2-core CPU; run with --runslow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow on CPU; pass --runslow to run")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none found)")
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def triton_interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@pytest.fixture(scope="session")
def cuda_emu_module():
    """csrc/ built against the host emulation of tests/cuda_emu (see tests/_cuda_emu.py).
    Skipped where it cannot be built (no C++ compiler or ninja); a compile error
    of the sources themselves fails the test."""
    import _cuda_emu
    why = _cuda_emu.why_unavailable()
    if why is not None:
        pytest.skip(f"the host emulation of csrc/ cannot be built here: {why}")
    return _cuda_emu.load()


@pytest.fixture
def emu(request, monkeypatch, capfd):
    """storyattn.backends._cuda_ext (and every backend built on it) served by the host
    emulation for this test, on CPU tensors; fails on any UBSan report."""
    from storyattn.backends import _cuda_ext
    mod = request.getfixturevalue("cuda_emu_module")
    monkeypatch.setattr(_cuda_ext, "_load", lambda: (mod, None))
    yield types.SimpleNamespace(name="emu", device="cpu", emulated=True)
    err = capfd.readouterr().err
    assert "runtime error" not in err, f"UBSan (misaligned access in csrc/):\n{err[-4000:]}"
