"""Packaging promises: a light, GPU-free import and no top-level ``kernels`` package."""
import os
import subprocess
import sys

import storyattn


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


def test_public_api_names():
    for name in ("segment_attention", "merge_attention_states", "available_backends",
                 "GroupSharedAttention", "GroupSharedFluxAttnProcessor", "ReferenceKVCache",
                 "GlobalReferenceAttnProcessor"):
        assert hasattr(storyattn, name), name
