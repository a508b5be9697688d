"""Tiny FLUX and SDXL(+IP-Adapter) presets, built offline with random weights.

The presets are written to disk in exactly the layout the real models use, so tests,
demos and benchmarks load them with the same code a user runs on real weights
(``FluxPipeline.from_pretrained(path)``, ``StableDiffusionXLPipeline.from_pretrained(path)``
followed by ``pipe.load_ip_adapter(...)``). Nothing is downloaded: tokenizers are built
from a small built-in word list, every model is initialised from a fixed seed, and two
builds with the same seed are bit-identical.

API
---
``build_tiny_flux(path, seed=0) -> str``
    A complete diffusers FLUX pipeline folder::

        path/model_index.json            FluxPipeline
        path/transformer/                FluxTransformer2DModel (tiny_flux_transformer_config())
        path/vae/                        AutoencoderKL, FLUX-style (16 latent channels,
                                         scaling/shift factors, no quant convs), scale factor 4
        path/text_encoder/               CLIPTextModel (hidden 32, 32 positions)
        path/tokenizer/                  CLIPTokenizer (byte-level BPE, model_max_length 32)
        path/text_encoder_2/             T5EncoderModel (d_model 32)
        path/tokenizer_2/                T5 tokenizer (Unigram, model_max_length 32)
        path/scheduler/                  FlowMatchEulerDiscreteScheduler (FLUX.1-dev config)

    Call it with ``max_sequence_length=TINY_MAX_SEQUENCE_LENGTH`` (32) and
    ``height=width=64``: ``FluxPipeline.__call__`` defaults to 512 text tokens and to a
    128-latent default size, which work but are needlessly slow. 64x64 gives 16x16
    latents = 8x8 = 64 packed image tokens; the transformer has 2 double + 2 single
    blocks, 2 heads x 16, ``guidance_embeds=True`` (pass ``guidance_scale``).

``build_tiny_sdxl(path, seed=0) -> str``
    A StableDiffusionXLPipeline folder plus an IP-Adapter stored inside it::

        path/model_index.json            StableDiffusionXLPipeline (no image encoder)
        path/unet/                       UNet2DConditionModel, SDXL-style ("text_time"),
                                         2 levels (32, 64 channels), 7 cross-attention layers
        path/vae/  path/scheduler/       AutoencoderKL (4 latent channels), EulerDiscreteScheduler
        path/text_encoder/ + tokenizer/      CLIPTextModel (hidden 32)
        path/text_encoder_2/ + tokenizer_2/  CLIPTextModelWithProjection (hidden 64, proj 32)
        path/ip_adapter/ip-adapter_tiny.safetensors   IP-Adapter weights (4 image tokens)
        path/ip_adapter/image_encoder/   CLIPVisionModelWithProjection (32x32 images,
                                         projection 32) + preprocessor_config.json
                                         (CLIPImageProcessor, size 32)

    Load the adapter the normal diffusers way::

        pipe = StableDiffusionXLPipeline.from_pretrained(path)
        pipe.load_ip_adapter(path, subfolder="ip_adapter",
                             weight_name="ip-adapter_tiny.safetensors",
                             image_encoder_folder="image_encoder")
        pipe.set_ip_adapter_scale(0.5)

    ``sdxl_ip_adapter_kwargs(path)`` returns exactly those keyword arguments.
    The UNet's default sample size is 16 latents, i.e. 64x64 images.

Cached presets
    ``get_tiny_flux(cache_dir=None, seed=0)`` / ``get_tiny_sdxl(cache_dir=None, seed=0)``
    build once into ``<root>/tiny-flux-v1`` / ``<root>/tiny-sdxl-v1`` (``-seedN`` appended
    for a seed other than 0) and return that path. ``<root>`` is ``cache_dir`` if given,
    else ``$STORYATTN_TINY_DIR``, else ``~/.cache/storyattn``. Builds go to a temporary
    folder next to the target and are renamed into place only when complete, so an
    interrupted or concurrent build is never seen half-written.

The builders and configs live in :mod:`pipelines.model_presets` (with the story world's);
this module names the cache and the command line.  ``tiny_flux_transformer_config()`` /
``tiny_sdxl_unet_config()`` return the model config dicts (``FluxTransformer2DModel(**tiny_flux_transformer_config())`` builds the same
architecture directly, without the pipeline).

``get_tiny_flux2(cache_dir=None, seed=0)`` is the same for the FLUX.2 [klein] preset of
:mod:`pipelines.tiny_flux2` (``<root>/tiny-flux2-v1``; call it with
``max_sequence_length=TINY_FLUX2_MAX_SEQUENCE_LENGTH`` and ``height=width=64``).

CLI: ``python -m pipelines.tiny --out DIR [--seed S] [--only flux|flux2|sdxl]`` builds them
into ``DIR/tiny-flux-v1``, ``DIR/tiny-flux2-v1`` and ``DIR/tiny-sdxl-v1`` and prints the paths.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from .model_presets import (SDXL_IMAGE_ENCODER_FOLDER, SDXL_IP_ADAPTER_NUM_TOKENS,
                            SDXL_IP_ADAPTER_SUBFOLDER, SDXL_IP_ADAPTER_WEIGHT_NAME, TINY_HEIGHT,
                            TINY_MAX_SEQUENCE_LENGTH, TINY_WIDTH, build_tiny_flux,
                            build_tiny_sdxl, sdxl_ip_adapter_kwargs, tiny_flux_transformer_config,
                            tiny_sdxl_unet_config)
from .tiny_flux2 import TINY_FLUX2_MAX_SEQUENCE_LENGTH, build_tiny_flux2

__all__ = [
    "TINY_VERSION",
    "TINY_HEIGHT",
    "TINY_WIDTH",
    "TINY_MAX_SEQUENCE_LENGTH",
    "TINY_FLUX_DIRNAME",
    "TINY_SDXL_DIRNAME",
    "TINY_FLUX2_DIRNAME",
    "TINY_FLUX2_MAX_SEQUENCE_LENGTH",
    "SDXL_IP_ADAPTER_SUBFOLDER",
    "SDXL_IP_ADAPTER_WEIGHT_NAME",
    "SDXL_IMAGE_ENCODER_FOLDER",
    "SDXL_IP_ADAPTER_NUM_TOKENS",
    "tiny_flux_transformer_config",
    "tiny_sdxl_unet_config",
    "build_tiny_flux",
    "build_tiny_sdxl",
    "get_tiny_flux",
    "get_tiny_sdxl",
    "get_tiny_flux2",
    "build_tiny_flux2",
    "default_cache_root",
    "sdxl_ip_adapter_kwargs",
    "main",
]

# bump when a preset's architecture or weights change: cached folders are named by it
TINY_VERSION = "v1"
TINY_FLUX_DIRNAME = f"tiny-flux-{TINY_VERSION}"
TINY_SDXL_DIRNAME = f"tiny-sdxl-{TINY_VERSION}"
TINY_FLUX2_DIRNAME = f"tiny-flux2-{TINY_VERSION}"

_COMPLETE_MARKER = ".storyattn_tiny_complete"


# ----------------------------------------------------------------------------------------
# cache


def default_cache_root() -> Path:
    env = os.environ.get("STORYATTN_TINY_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "storyattn"


def cached(builder, dirname: str, cache_dir, seed: int) -> str:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    name = dirname if seed == 0 else f"{dirname}-seed{seed}"
    final = root / name
    if (final / _COMPLETE_MARKER).is_file():
        return str(final)
    root.mkdir(parents=True, exist_ok=True)
    if final.exists() and not (final / _COMPLETE_MARKER).is_file():
        # a folder without the completion marker was left by an interrupted writer that
        # did not use this function: move it aside (complete builds appear atomically,
        # marker included, so a concurrent finished build is never taken for this)
        stale = Path(tempfile.mkdtemp(prefix=f".{name}.stale-", dir=root))
        try:
            if not (final / _COMPLETE_MARKER).is_file():
                os.replace(final, stale / name)
        except OSError:
            pass
        shutil.rmtree(stale, ignore_errors=True)
        if (final / _COMPLETE_MARKER).is_file():
            return str(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        builder(tmp / "build", seed=seed)
        (tmp / "build" / _COMPLETE_MARKER).write_text(
            json.dumps({"version": TINY_VERSION, "seed": seed}) + "\n"
        )
        try:
            os.rename(tmp / "build", final)
        except OSError:
            # another process finished first; use its (identical) build
            if not (final / _COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def get_tiny_flux(cache_dir=None, seed: int = 0) -> str:
    """Path of the cached tiny FLUX pipeline folder, built on first use."""
    return cached(build_tiny_flux, TINY_FLUX_DIRNAME, cache_dir, seed)


def get_tiny_flux2(cache_dir=None, seed: int = 0) -> str:
    """Path of the cached tiny FLUX.2 [klein] pipeline folder (Qwen3 text encoder and
    tokenizer built offline; :mod:`pipelines.tiny_flux2`), built on first use."""
    return cached(build_tiny_flux2, TINY_FLUX2_DIRNAME, cache_dir, seed)


def get_tiny_sdxl(cache_dir=None, seed: int = 0) -> str:
    """Path of the cached tiny SDXL (+IP-Adapter) pipeline folder, built on first use."""
    return cached(build_tiny_sdxl, TINY_SDXL_DIRNAME, cache_dir, seed)


# ----------------------------------------------------------------------------------------
# CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.tiny",
        description="Build the tiny offline FLUX, FLUX.2 [klein] and SDXL(+IP-Adapter) presets.",
    )
    parser.add_argument("--out", default=None,
                        help="root folder (default: $STORYATTN_TINY_DIR or ~/.cache/storyattn)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["flux", "sdxl", "flux2"], default=None)
    args = parser.parse_args(argv)
    if args.only in (None, "flux"):
        print("flux:", get_tiny_flux(args.out, seed=args.seed))
    if args.only in (None, "flux2"):
        print("flux2:", get_tiny_flux2(args.out, seed=args.seed))
    if args.only in (None, "sdxl"):
        path = get_tiny_sdxl(args.out, seed=args.seed)
        print("sdxl:", path)
        kw = sdxl_ip_adapter_kwargs(path)
        print(
            "  ip-adapter: pipe.load_ip_adapter({!r}, subfolder={!r}, weight_name={!r}, "
            "image_encoder_folder={!r})".format(
                kw["pretrained_model_name_or_path_or_dict"], kw["subfolder"], kw["weight_name"],
                kw["image_encoder_folder"],
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
