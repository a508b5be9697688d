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

``tiny_flux_transformer_config()`` / ``tiny_sdxl_unet_config()`` return the model config
dicts (``FluxTransformer2DModel(**tiny_flux_transformer_config())`` builds the same
architecture directly, without the pipeline).

CLI: ``python -m pipelines.tiny --out DIR [--seed S] [--only flux|sdxl]`` builds both into
``DIR/tiny-flux-v1`` and ``DIR/tiny-sdxl-v1`` and prints the paths.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = [
    "TINY_VERSION",
    "TINY_HEIGHT",
    "TINY_WIDTH",
    "TINY_MAX_SEQUENCE_LENGTH",
    "TINY_FLUX_DIRNAME",
    "TINY_SDXL_DIRNAME",
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
    "default_cache_root",
    "sdxl_ip_adapter_kwargs",
    "main",
]

TINY_VERSION = "v1"
TINY_HEIGHT = 64
TINY_WIDTH = 64
TINY_MAX_SEQUENCE_LENGTH = 32
TINY_FLUX_DIRNAME = f"tiny-flux-{TINY_VERSION}"
TINY_SDXL_DIRNAME = f"tiny-sdxl-{TINY_VERSION}"

SDXL_IP_ADAPTER_SUBFOLDER = "ip_adapter"
SDXL_IP_ADAPTER_WEIGHT_NAME = "ip-adapter_tiny.safetensors"
SDXL_IMAGE_ENCODER_FOLDER = "image_encoder"
SDXL_IP_ADAPTER_NUM_TOKENS = 4

_COMPLETE_MARKER = ".storyattn_tiny_complete"

# Words the tokenizers know as whole tokens; anything else falls back to pieces
# (bytes for CLIP, characters for T5), so every prompt tokenizes.
_WORDS = """
a an the and or but with without of in on at to from into over under near by for as is are
was were be been it its this that these those he she they his her their him them we you i
one two three four five six seven eight nine ten many some all every each other more most
very not no yes up down out off again then there here when where who what which while after
before during through across around behind between above below inside outside together alone
snowman snow fox red white orange black blue green yellow brown gray grey gold silver pink
purple dark light bright small big little large tall short old young happy sad angry scared
tired sleepy curious friendly shy brave quiet loud cold warm hot winter summer spring autumn
night day morning evening sunset sunrise sky star stars moon sun cloud clouds rain wind storm
tree trees forest wood woods hill hills mountain mountains river lake pond ice frozen field
meadow village house home door window fire fireplace road path bridge garden flower flowers
boy girl man woman child children friend friends family mother father cat dog bird owl rabbit
bear deer wolf horse mouse fish tail ears eyes nose carrot hat scarf coat boots hand hands
face smile smiles smiling looks looking look sees see watches walks walking runs running
jumps jumping sits sitting stands standing sleeps sleeping plays playing meets meet finds
find holds holding gives give shares share hugs hug waves wave dances dancing sings singing
laughs laughing cries crying melts melting builds building flies flying swims eats eating
drinks reads story book picture painting illustration watercolor style cartoon digital art
photo photograph portrait close closeup wide shot view scene background foreground detailed
beautiful cute soft gentle cozy magical high quality best masterpiece render cinematic
lighting first last next new same character characters together goodbye hello
""".split()


# ----------------------------------------------------------------------------------------
# configs


def tiny_flux_transformer_config() -> dict:
    """Config of the tiny FluxTransformer2DModel (FLUX.1-dev layout, tiny sizes)."""
    return {
        "patch_size": 1,
        "in_channels": 64,  # 2x2 packed patches of 16 VAE latent channels
        "out_channels": None,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,  # T5 d_model
        "pooled_projection_dim": 32,  # CLIP text hidden size (pooled output)
        "guidance_embeds": True,
        "axes_dims_rope": (4, 6, 6),  # sums to attention_head_dim
    }


def _vae_config(**family) -> dict:
    """The tiny AutoencoderKL both presets share; ``family`` holds what differs
    (latent channels, scaling/shift factors, conv layout)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "block_out_channels": (16, 32, 32),
        "layers_per_block": 1,
        "act_fn": "silu",
        "norm_num_groups": 8,
        "sample_size": 64,
        **family,
    }


def _flux_vae_config() -> dict:
    # FLUX.1's VAE: 16 latent channels, scaling and shift factors, no quant convs.
    return _vae_config(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                       force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
                       mid_block_add_attention=True)


def _sdxl_vae_config() -> dict:
    return _vae_config(latent_channels=4, scaling_factor=0.13025, force_upcast=False)


_SDXL_TE1_HIDDEN = 32
_SDXL_TE2_HIDDEN = 64
_SDXL_TE2_PROJ = 32
_SDXL_TIME_EMBED_DIM = 8


def tiny_sdxl_unet_config() -> dict:
    """Config of the tiny SDXL-style UNet2DConditionModel."""
    return {
        "sample_size": TINY_HEIGHT // 4,  # vae scale factor 4 -> 64x64 images by default
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "transformer_layers_per_block": 1,
        # as in SDXL's config, "attention_head_dim" holds the number of heads per level
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "cross_attention_dim": _SDXL_TE1_HIDDEN + _SDXL_TE2_HIDDEN,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": _SDXL_TIME_EMBED_DIM,
        # 6 micro-conditioning numbers (original size, crop, target size) + pooled text
        "projection_class_embeddings_input_dim": 6 * _SDXL_TIME_EMBED_DIM + _SDXL_TE2_PROJ,
    }


# ----------------------------------------------------------------------------------------
# tokenizers


def _byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet: printable bytes map to themselves, the rest to
    code points from 256 upward, so every byte has a visible, distinct character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    table = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bpe_split(word: str, ranks: dict) -> list:
    """Split an ASCII word the way BPE with the '</w>' suffix does under ``ranks``."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        best = None
        for i in range(len(symbols) - 1):
            r = ranks.get((symbols[i], symbols[i + 1]))
            if r is not None and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        i = best[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _build_clip_tokenizer(model_max_length: int, words=None):
    """A CLIP tokenizer (byte-level BPE, '</w>' end-of-word suffix) over the word list
    (``words`` when given: the story world adds its names)."""
    from transformers import CLIPTokenizer

    alphabet = [_byte_to_unicode()[b] for b in range(256)]
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words or _WORDS:
        # every word is ASCII, so its byte-level characters are its letters. Append merges
        # until the word is one token; merges added later never change how earlier words
        # split (BPE always applies the lowest-ranked available merge first).
        while True:
            symbols = _bpe_split(word, ranks)
            if len(symbols) == 1:
                break
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            merged = pair[0] + pair[1]
            if merged not in vocab:
                vocab[merged] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _build_t5_tokenizer(model_max_length: int, words=None):
    """A T5 tokenizer (Unigram, '\u2581' word prefix) over the word list (or ``words``)."""
    from transformers import T5TokenizerFast

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    known = {p for p, _ in pieces}
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    for ch in chars:
        pieces.append((ch, -10.0))
        known.add(ch)
    for word in words or _WORDS:
        piece = "\u2581" + word
        if piece not in known:
            known.add(piece)
            pieces.append((piece, -5.0))
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


# ----------------------------------------------------------------------------------------
# building blocks


@contextlib.contextmanager
def _seeded(seed: int):
    """Deterministic init without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _clip_text_config(vocab_size, eos_id, bos_id, hidden, heads, proj, max_len):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=proj,
        num_hidden_layers=2,
        num_attention_heads=heads,
        max_position_embeddings=max_len,
        hidden_act="quick_gelu",
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def _prepare_target(path) -> Path:
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; refusing to overwrite it")
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_tiny_flux(path, seed: int = 0) -> str:
    """Write a tiny FLUX.1-dev-style diffusers pipeline folder to ``path``; return it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    path = _prepare_target(path)
    tokenizer = _build_clip_tokenizer(TINY_MAX_SEQUENCE_LENGTH)
    tokenizer_2 = _build_t5_tokenizer(TINY_MAX_SEQUENCE_LENGTH)

    with _seeded(seed * 1000 + 1):
        transformer = FluxTransformer2DModel(**tiny_flux_transformer_config())
    with _seeded(seed * 1000 + 2):
        vae = AutoencoderKL(**_flux_vae_config())
    with _seeded(seed * 1000 + 3):
        text_encoder = CLIPTextModel(
            _clip_text_config(
                len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id,
                hidden=32, heads=2, proj=32, max_len=TINY_MAX_SEQUENCE_LENGTH,
            )
        )
    with _seeded(seed * 1000 + 4):
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2),
                d_model=32,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=32,
                dropout_rate=0.0,
                feed_forward_proj="gated-gelu",
                tie_word_embeddings=False,
                pad_token_id=tokenizer_2.pad_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
                decoder_start_token_id=tokenizer_2.pad_token_id,
            )
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        transformer=transformer.eval(),
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def build_tiny_sdxl(path, seed: int = 0) -> str:
    """Write a tiny SDXL pipeline folder with an IP-Adapter inside it; return ``path``.

    The adapter loads with ``pipe.load_ip_adapter(path, **ip_kwargs)`` where ip_kwargs
    is ``sdxl_ip_adapter_kwargs(path)`` minus the path (see the module docstring).
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.models.embeddings import ImageProjection
    from safetensors.torch import save_file
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    path = _prepare_target(path)
    tokenizer = _build_clip_tokenizer(TINY_MAX_SEQUENCE_LENGTH)
    tokenizer_2 = _build_clip_tokenizer(TINY_MAX_SEQUENCE_LENGTH)
    unet_cfg = tiny_sdxl_unet_config()

    with _seeded(seed * 1000 + 11):
        unet = UNet2DConditionModel(**unet_cfg)
    with _seeded(seed * 1000 + 12):
        vae = AutoencoderKL(**_sdxl_vae_config())
    with _seeded(seed * 1000 + 13):
        text_encoder = CLIPTextModel(
            _clip_text_config(
                len(tokenizer), tokenizer.eos_token_id, tokenizer.bos_token_id,
                hidden=_SDXL_TE1_HIDDEN, heads=2, proj=_SDXL_TE1_HIDDEN, max_len=TINY_MAX_SEQUENCE_LENGTH,
            )
        )
    with _seeded(seed * 1000 + 14):
        text_encoder_2 = CLIPTextModelWithProjection(
            _clip_text_config(
                len(tokenizer_2), tokenizer_2.eos_token_id, tokenizer_2.bos_token_id,
                hidden=_SDXL_TE2_HIDDEN, heads=4, proj=_SDXL_TE2_PROJ, max_len=TINY_MAX_SEQUENCE_LENGTH,
            )
        )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet.eval(),
        scheduler=scheduler,
    )
    pipe.save_pretrained(str(path), safe_serialization=True)

    # image encoder (CLIP vision tower with projection) + its preprocessor
    image_size = 32
    with _seeded(seed * 1000 + 15):
        image_encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                projection_dim=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_channels=3,
                image_size=image_size,
                patch_size=8,
                hidden_act="quick_gelu",
            )
        )
    ip_dir = path / SDXL_IP_ADAPTER_SUBFOLDER
    enc_dir = ip_dir / SDXL_IMAGE_ENCODER_FOLDER
    image_encoder.eval().save_pretrained(str(enc_dir), safe_serialization=True)
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    ).save_pretrained(str(enc_dir))

    # IP-Adapter weights in the original layout: "image_proj.proj/norm.*" and
    # "ip_adapter.{k}.to_k_ip/to_v_ip.weight", k = 1, 3, 5, ... over the UNet's
    # cross-attention layers in attn_processors order (the original counts attn1
    # layers at the even numbers).
    cross_dim = unet_cfg["cross_attention_dim"]
    tensors: dict[str, torch.Tensor] = {}
    with _seeded(seed * 1000 + 16):
        proj = ImageProjection(
            image_embed_dim=image_encoder.config.projection_dim,
            cross_attention_dim=cross_dim,
            num_image_text_embeds=SDXL_IP_ADAPTER_NUM_TOKENS,
        )
        tensors["image_proj.proj.weight"] = proj.image_embeds.weight.detach().clone()
        tensors["image_proj.proj.bias"] = proj.image_embeds.bias.detach().clone()
        tensors["image_proj.norm.weight"] = proj.norm.weight.detach().clone()
        tensors["image_proj.norm.bias"] = proj.norm.bias.detach().clone()
        key_id = 1
        for name in unet.attn_processors.keys():
            if name.endswith("attn1.processor"):
                continue
            attn = unet.get_submodule(name[: -len(".processor")])
            hidden = attn.to_q.out_features
            to_k_ip = torch.nn.Linear(cross_dim, hidden, bias=False)
            to_v_ip = torch.nn.Linear(cross_dim, hidden, bias=False)
            tensors[f"ip_adapter.{key_id}.to_k_ip.weight"] = to_k_ip.weight.detach().clone()
            tensors[f"ip_adapter.{key_id}.to_v_ip.weight"] = to_v_ip.weight.detach().clone()
            key_id += 2
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(ip_dir / SDXL_IP_ADAPTER_WEIGHT_NAME), metadata={"format": "pt"})
    return str(path)


def sdxl_ip_adapter_kwargs(path) -> dict:
    """Arguments for ``pipe.load_ip_adapter(**sdxl_ip_adapter_kwargs(path))``."""
    return {
        "pretrained_model_name_or_path_or_dict": str(path),
        "subfolder": SDXL_IP_ADAPTER_SUBFOLDER,
        "weight_name": SDXL_IP_ADAPTER_WEIGHT_NAME,
        "image_encoder_folder": SDXL_IMAGE_ENCODER_FOLDER,
    }


# ----------------------------------------------------------------------------------------
# cache


def default_cache_root() -> Path:
    env = os.environ.get("STORYATTN_TINY_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "storyattn"


def _cached(builder, dirname: str, cache_dir, seed: int) -> str:
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
    return _cached(build_tiny_flux, TINY_FLUX_DIRNAME, cache_dir, seed)


def get_tiny_sdxl(cache_dir=None, seed: int = 0) -> str:
    """Path of the cached tiny SDXL (+IP-Adapter) pipeline folder, built on first use."""
    return _cached(build_tiny_sdxl, TINY_SDXL_DIRNAME, cache_dir, seed)


# ----------------------------------------------------------------------------------------
# CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.tiny",
        description="Build the tiny offline FLUX and SDXL(+IP-Adapter) presets.",
    )
    parser.add_argument("--out", default=None,
                        help="root folder (default: $STORYATTN_TINY_DIR or ~/.cache/storyattn)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["flux", "sdxl"], default=None)
    args = parser.parse_args(argv)
    if args.only in (None, "flux"):
        print("flux:", get_tiny_flux(args.out, seed=args.seed))
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
