"""Packaging promises: a light, GPU-free import and no top-level ``kernels`` package."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import storyattn

REPO = Path(__file__).resolve().parent.parent


def _run(code, cwd):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_import_is_light_and_gpu_free(tmp_path):
    code = ("import sys, storyattn\n"
            "heavy = [m for m in ('triton', 'diffusers', 'transformers', 'flash_attn', "
            "'xformers', 'storyattn._C') if m in sys.modules]\n"
            "import torch\n"
            "print('heavy', heavy, 'cuda_init', torch.cuda.is_initialized())\n")
    r = _run(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "heavy [] cuda_init False" in r.stdout, r.stdout


def test_kernels_install_as_storyattn_kernels_only(tmp_path):
    """Outside the checkout, ``kernels`` must not resolve to our folder (that name
    belongs to the Hugging Face ``kernels`` distribution)."""
    code = ("import importlib.util, os, storyattn.kernels as k\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "ours = os.path.dirname(os.path.abspath(k.__file__))\n"
            "theirs = None if spec is None or spec.origin is None else "
            "os.path.dirname(os.path.abspath(spec.origin))\n"
            "print('shadowed' if theirs == ours else 'ok')\n")
    r = _run(code, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


_FIND_KERNELS = ("import importlib.util, os\n"
                 "spec = importlib.util.find_spec('kernels')\n"
                 "print('none' if spec is None else os.path.abspath(spec.origin or "
                 "list(spec.submodule_search_locations)[0]))\n")


# Every folder a user or CI runs commands from.  (Inside a package's own source folder,
# storyattn/, Python exposes each submodule as a top-level name: that is true of every
# package and is not a place to run from.)
@pytest.mark.parametrize("where", [".", "tests", "pipelines", "benchmarks", "tools", "docs"])
def test_no_folder_of_the_checkout_resolves_as_top_level_kernels(where):
    """``python -m`` and pytest put the working directory first on ``sys.path``: from the
    repository root (and its main folders) the name ``kernels`` must still be Hugging
    Face's distribution, or nothing at all, never a folder of this repository."""
    r = _run(_FIND_KERNELS, REPO / where)
    assert r.returncode == 0, r.stderr
    origin = r.stdout.strip()
    assert origin == "none" or not origin.startswith(str(REPO) + os.sep), origin


def test_hf_kernels_and_tiny_flux_load_from_the_repository_root(tmp_path):
    """With Hugging Face's ``kernels`` installed (transformers >= 5.25 requires it), a
    tiny FLUX pipeline loads through ``from_pretrained`` (transformers' model loading
    included) in a process started at the repository root, as README's commands are."""
    pytest.importorskip("kernels", reason="Hugging Face's kernels distribution is not installed")
    code = ("import kernels, os, sys\n"
            "assert not os.path.abspath(kernels.__file__).startswith(sys.argv[1]), kernels.__file__\n"
            "import torch\n"
            "from diffusers import FluxPipeline\n"
            "from pipelines.tiny import build_tiny_flux\n"
            "path = build_tiny_flux(sys.argv[2])\n"
            "pipe = FluxPipeline.from_pretrained(path)\n"
            "print('loaded', type(pipe.text_encoder).__name__, type(pipe.text_encoder_2).__name__)\n")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", code, str(REPO) + os.sep, str(tmp_path / "flux")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loaded CLIPTextModel T5EncoderModel" in r.stdout, r.stdout


def test_public_api_names():
    for name in ("segment_attention", "merge_attention_states", "available_backends",
                 "GroupSharedAttention", "GroupSharedFluxAttnProcessor", "ReferenceKVCache",
                 "GlobalReferenceAttnProcessor"):
        assert hasattr(storyattn, name), name
