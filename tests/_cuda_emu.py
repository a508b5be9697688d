"""Build ``csrc/`` against the host emulation of ``tests/cuda_emu`` (tests only).

The real kernel sources (csrc/*.cu) and the real torch glue (csrc/bindings.cpp)
are compiled with the host C++ compiler, ``-DSTORYATTN_EMULATE_CUDA`` and
``tests/cuda_emu`` first on the include path.  The only change made to the
sources is mechanical: each ``kernel<<<grid, block, smem, stream>>>(args);``
launch becomes ``::storyattn_emu::launch(grid, block, smem, stream, &kernel,
args);`` (plain C++ cannot parse the chevrons).  The result is a module with
the API of ``storyattn._C`` that takes CPU tensors, so the GPU parity tests
also run here, on the kernels' own code.

``-fsanitize=alignment`` makes every misaligned vector access (a ``float2`` /
``__half2`` pair, a 16-byte ``Pack``) print a "runtime error" line on stderr;
the tests capture stderr and fail on it.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from functools import lru_cache
from typing import Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
EMU_INCLUDE = os.path.join(ROOT, "tests", "cuda_emu")

_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<([^;]*?)>>>\(([^;]*?)\);")


def rewrite_launches(src: str) -> Tuple[str, int]:
    """``k<T, N><<<g, b, s, st>>>(a, b);`` -> ``::storyattn_emu::launch(g, b, s, st, &k<T, N>, a, b);``"""
    def sub(m):
        args = m.group(3).strip()
        return (f"::storyattn_emu::launch({m.group(2)}, &{m.group(1)}"
                + (f", {args}" if args else "") + ");")
    return _LAUNCH.subn(sub, src)


def _write_if_changed(path: str, text: str) -> None:
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return  # keep the mtime: no needless rebuild
    with open(path, "w") as f:
        f.write(text)


def _sources(build_dir: str):
    out = []
    for name in sorted(os.listdir(CSRC)):
        if not name.endswith(".cu"):
            continue
        with open(os.path.join(CSRC, name)) as f:
            src = f.read()
        new, n = rewrite_launches(src)
        if "<<<" in new:
            raise RuntimeError(f"csrc/{name}: a kernel launch the emulation cannot rewrite "
                               f"(expected `kernel<...><<<grid, block, smem, stream>>>(args);`)")
        dst = os.path.join(build_dir, name[:-3] + ".emu.cpp")
        _write_if_changed(dst, f'#line 1 "csrc/{name}"\n' + new)
        out.append(dst)
    out.append(os.path.join(CSRC, "bindings.cpp"))
    return out


def build_dir() -> str:
    base = os.environ.get("STORYATTN_EMU_BUILD_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "storyattn", "cuda_emu")
    # one folder per checkout, so two clones never share object files
    tag = hashlib.sha1(ROOT.encode()).hexdigest()[:10]
    path = os.path.join(base, tag)
    os.makedirs(path, exist_ok=True)
    return path


def _ensure_ninja_on_path() -> bool:
    """torch's extension builder runs `ninja`; the PyPI wheel's copy is not on
    PATH in an unactivated virtualenv, so add its folder."""
    if shutil.which("ninja") is not None:
        return True
    try:
        import ninja
    except ImportError:
        return False
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("ninja") is not None


def why_unavailable() -> Optional[str]:
    """None when the emulation can be built here, else why not."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (c++) on PATH"
    if not _ensure_ninja_on_path():
        return "ninja is not installed (pip install ninja)"
    return None


@lru_cache(maxsize=None)
def load():
    """The emulated ``storyattn._C`` (built on first use, then cached on disk)."""
    from torch.utils.cpp_extension import load as load_ext
    _ensure_ninja_on_path()
    bdir = build_dir()
    flags = ["-O2", "-DSTORYATTN_EMULATE_CUDA", "-ffp-contract=off", "-fno-strict-aliasing",
             "-fsanitize=alignment", "-pthread", "-Wno-unknown-pragmas"]
    return load_ext(
        name="storyattn_emu_C",
        sources=_sources(bdir),
        extra_include_paths=[EMU_INCLUDE, CSRC],
        extra_cflags=flags,
        extra_ldflags=["-fsanitize=alignment", "-pthread"],
        build_directory=bdir,
        with_cuda=False,
        verbose=False,
    )
