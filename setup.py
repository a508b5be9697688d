"""Build script for storyattn.

The Python package (Triton kernels, torch backends, processors, pipelines) needs
no compiler.  The optional CUDA extension ``storyattn._C`` (sources in
``csrc/``) is built only when a CUDA toolchain *and* a CUDA build of torch are
present in the build environment:

    STORYATTN_FORCE_CUDA_BUILD=1 pip install -e . --no-build-isolation

Environment:
  STORYATTN_SKIP_CUDA_BUILD=1   never build the extension
  STORYATTN_FORCE_CUDA_BUILD=1  build it (fail loudly if it cannot be built)
  TORCH_CUDA_ARCH_LIST          target architectures (default "8.0;9.0")
"""
import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_extensions():
    """Return (ext_modules, cmdclass) for storyattn._C, or ([], {}) with a reason printed."""
    if _flag("STORYATTN_SKIP_CUDA_BUILD"):
        print("storyattn: STORYATTN_SKIP_CUDA_BUILD=1, not building storyattn._C", file=sys.stderr)
        return [], {}
    force = _flag("STORYATTN_FORCE_CUDA_BUILD")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))

    def skip(why):
        if force:
            raise RuntimeError(f"STORYATTN_FORCE_CUDA_BUILD=1 but storyattn._C cannot be built: {why}")
        print(f"storyattn: not building storyattn._C ({why}); the Triton and torch backends "
              "work without it", file=sys.stderr)
        return [], {}

    if not sources:
        return skip("no sources in csrc/")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:  # isolated build env: torch is not visible
        return skip(f"torch is not importable in the build environment ({e}); "
                    "use pip install --no-build-isolation")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU build")
    if CUDA_HOME is None:
        return skip("no CUDA toolchain (CUDA_HOME/nvcc not found)")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr",
                  "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                  "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-lineinfo"]
    # The C++ ABI of std::string must be torch's.  torch's cpp_extension no longer passes
    # -D_GLIBCXX_USE_CXX11_ABI, so a compiler whose default is the old ABI (devtoolset-style
    # GCC, as /opt/gcc on the lent H200 may be) builds an extension that works until an
    # error message crosses into libc10: the first failing TORCH_CHECK crashed the process
    # there (benchmarks/results/gpu_h200/README.md).  State torch's ABI explicitly.
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(bool(getattr(torch._C, '_GLIBCXX_USE_CXX11_ABI', True)))}"
    nvcc_flags.append(abi)
    ext = CUDAExtension(
        name="storyattn._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        depends=sorted(glob.glob(os.path.join("csrc", "*.h")) + glob.glob(os.path.join("csrc", "*.cuh"))),
        # No -std for the C++ glue: torch's headers need C++20 and torch adds it
        # itself when none is given.  The .cu files include no torch headers.
        extra_compile_args={"cxx": ["-O3", abi], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="storyattn",
    version="0.1.0",
    description="Fused segment-attention kernels and diffusers attention processors "
                "for consistent story visualization (Group-Shared Attention, Story-Iter)",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(
        os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # The Triton kernels live inside the package (storyattn/kernels/): a top-level
    # "kernels" folder would shadow Hugging Face's `kernels` distribution, which
    # transformers and diffusers import, whenever Python runs from the checkout.
    packages=find_packages(include=["storyattn", "storyattn.*", "pipelines", "pipelines.*"]),
    package_data={"pipelines.studio": ["static/*.html", "static/*.js", "static/*.css"],
                  # ViStoryBench's Lite story ids (python -m pipelines.vistorybench --split lite)
                  "pipelines.vistorybench": ["lite.json"],
                  # the story world's trained weights (python -m pipelines.world build)
                  "pipelines.world": ["weights/*", "weights/*/*", "weights/*/*/*",
                                      "weights/*/*/*/*"]},
    # Floors: the lowest versions that tools/check_floors.sh installs together and tests
    # (tools/floors.txt; tests/test_floors.py keeps the two lists equal).  torch: the CPU
    # build of 2.13.0 runs every test here; 2.11.0+cu130 ran the GPU tests on an H200.
    install_requires=[
        "torch>=2.11",
        "triton>=3.2; platform_system=='Linux'",
        "diffusers>=0.36",
        "transformers>=5.0",
        "peft>=0.21",
        "accelerate>=1.0",
        "safetensors>=0.4.3",
        "tqdm",
        "psutil",
        "pillow",
        "numpy",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "pytest-benchmark>=4", "matplotlib", "ninja",
                 "fastapi>=0.110", "uvicorn>=0.29", "httpx", "selenium>=4.10"],
        # the local studio page (python -m pipelines.studio)
        "studio": ["fastapi>=0.110", "uvicorn>=0.29"],
        "bench": ["matplotlib"],
        "flash": ["flash-attn>=2.6"],
        "xformers": ["xformers>=0.0.28"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
