"""Model presets: the tiny and story-world architectures and the builders that write them
as diffusers pipeline folders (offline, random weights, bit-identical for one seed).

One place for the pattern every preset repeats: seeded components (each from its own fixed
seed, without touching the caller's RNG), tokenizers over a built-in word list (no
download), and ``save_pretrained`` into the layout the real models use.

* tiny FLUX / tiny SDXL (+ IP-Adapter): :func:`build_tiny_flux`, :func:`build_tiny_sdxl`
  (``pipelines.tiny`` caches them and documents their layout);
* the story world's FLUX and SDXL: :func:`build_world_pipeline`,
  :func:`build_world_sdxl_pipeline` (their words include the world's names; the world build
  trains them, ``pipelines/world/weights`` holds the result);
* the generic builders both use: :func:`build_flux_pipeline`, :func:`build_sdxl_pipeline`.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .world import data as world_data

__all__ = [
    "TINY_HEIGHT", "TINY_WIDTH", "TINY_MAX_SEQUENCE_LENGTH", "SDXL_IP_ADAPTER_SUBFOLDER",
    "SDXL_IP_ADAPTER_WEIGHT_NAME", "SDXL_IMAGE_ENCODER_FOLDER", "SDXL_IP_ADAPTER_NUM_TOKENS",
    "WORDS", "seeded", "seeded_components", "clip_tokenizer", "t5_tokenizer", "clip_text_config",
    "tiny_flux_transformer_config", "tiny_sdxl_unet_config", "flux_vae_config",
    "sdxl_vae_config", "build_flux_pipeline", "build_sdxl_pipeline", "build_tiny_flux",
    "build_tiny_sdxl", "sdxl_ip_adapter_kwargs", "WORLD_WORDS", "WORLD_MAX_SEQUENCE_LENGTH",
    "world_transformer_config", "world_vae_config", "world_sdxl_unet_config",
    "build_world_pipeline", "build_world_sdxl_pipeline", "images_to_tensor", "tensor_to_uint8",
]

TINY_HEIGHT = 64
TINY_WIDTH = 64
TINY_MAX_SEQUENCE_LENGTH = 32

SDXL_IP_ADAPTER_SUBFOLDER = "ip_adapter"
SDXL_IP_ADAPTER_WEIGHT_NAME = "ip-adapter_tiny.safetensors"
SDXL_IMAGE_ENCODER_FOLDER = "image_encoder"
SDXL_IP_ADAPTER_NUM_TOKENS = 4

# Words the tokenizers know as whole tokens; anything else falls back to pieces
# (bytes for CLIP, characters for T5), so every prompt tokenizes.
WORDS = """
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


def flux_vae_config() -> dict:
    # FLUX.1's VAE: 16 latent channels, scaling and shift factors, no quant convs.
    return _vae_config(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                       force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
                       mid_block_add_attention=True)


def sdxl_vae_config() -> dict:
    return _vae_config(latent_channels=4, scaling_factor=0.13025, force_upcast=False)


SDXL_TE1_HIDDEN = 32
SDXL_TE2_HIDDEN = 64
SDXL_TE2_PROJ = 32
SDXL_TIME_EMBED_DIM = 8


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
        "cross_attention_dim": SDXL_TE1_HIDDEN + SDXL_TE2_HIDDEN,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
        # 6 micro-conditioning numbers (original size, crop, target size) + pooled text
        "projection_class_embeddings_input_dim": 6 * SDXL_TIME_EMBED_DIM + SDXL_TE2_PROJ,
    }


# ----------------------------------------------------------------------------------------
# tokenizers


def byte_to_unicode() -> dict[int, str]:
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


def bpe_merge(symbols: list, ranks: dict) -> list:
    """BPE of a symbol list under ``ranks``: the lowest-ranked adjacent pair is merged first,
    until no pair has a rank (the CLIP and Qwen tokenizers built here share it)."""
    symbols = list(symbols)
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


def _bpe_split(word: str, ranks: dict) -> list:
    """Split an ASCII word the way BPE with the '</w>' suffix does under ``ranks``."""
    return bpe_merge(list(word[:-1]) + [word[-1] + "</w>"], ranks)


def clip_tokenizer(model_max_length: int, words=None):
    """A CLIP tokenizer (byte-level BPE, '</w>' end-of-word suffix) over the word list
    (``words`` when given: the story world adds its names)."""
    from transformers import CLIPTokenizer

    alphabet = [byte_to_unicode()[b] for b in range(256)]
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words or WORDS:
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


def t5_tokenizer(model_max_length: int, words=None):
    """A T5 tokenizer (Unigram, '\u2581' word prefix) over the word list (or ``words``)."""
    from transformers import T5TokenizerFast

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    known = {p for p, _ in pieces}
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    for ch in chars:
        pieces.append((ch, -10.0))
        known.add(ch)
    for word in words or WORDS:
        piece = "\u2581" + word
        if piece not in known:
            known.add(piece)
            pieces.append((piece, -5.0))
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


# ----------------------------------------------------------------------------------------
# building blocks


@contextlib.contextmanager
def seeded(seed: int):
    """Deterministic init without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def seeded_components(base: int, *makers) -> list:
    """``makers[i]()`` each under its own seed ``base + i``: a preset's components (denoiser,
    VAE, text encoders) get fixed weights each, whichever of them the caller passes in
    already built (a maker that returns a given module draws nothing)."""
    out = []
    for i, make in enumerate(makers):
        with seeded(base + i):
            out.append(make())
    return out


def clip_text_config(vocab_size, eos_id, bos_id, hidden, heads, proj, max_len):
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


def empty_target(path) -> Path:
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} exists and is not empty; refusing to overwrite it")
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------
# the two pipeline builders every preset uses
#
# Seeds: component k of a preset is initialised from ``seed * 1000 + first + k`` (k = 0 the
# denoiser, 1 the VAE, 2 and 3 the text encoders), so a preset's weights depend only on its
# seed and a component passed in (already trained) leaves the others' numbers unchanged.


def build_flux_pipeline(path, transformer_config: dict, vae_config: dict, *, seed: int,
                        first: int, max_len: int, words: Optional[Sequence[str]] = None,
                        transformer=None, vae=None) -> str:
    """Write a FluxPipeline folder: the given (or seeded random) transformer and VAE, tiny
    CLIP + T5 text encoders over ``words``, FLUX.1-dev's scheduler config."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tok = clip_tokenizer(max_len, words)
    tok2 = t5_tokenizer(max_len, words)
    transformer, vae, te, te2 = seeded_components(
        seed * 1000 + first,
        lambda: transformer or FluxTransformer2DModel(**transformer_config),
        lambda: vae or AutoencoderKL(**vae_config),
        lambda: CLIPTextModel(clip_text_config(len(tok), tok.eos_token_id, tok.bos_token_id,
                                               hidden=32, heads=2, proj=32, max_len=max_len)),
        lambda: T5EncoderModel(T5Config(
            vocab_size=len(tok2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=32,
            dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
            pad_token_id=tok2.pad_token_id, eos_token_id=tok2.eos_token_id,
            decoder_start_token_id=tok2.pad_token_id)))
    sched = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=vae.eval(), text_encoder=te.eval(), tokenizer=tok,
                        text_encoder_2=te2.eval(), tokenizer_2=tok2,
                        transformer=transformer.eval())
    pipe.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def build_sdxl_pipeline(path, unet_config: dict, scheduler, *, seed: int, first: int,
                        max_len: int, words: Optional[Sequence[str]] = None,
                        vae_config: Optional[dict] = None, unet=None, vae=None):
    """Write a StableDiffusionXLPipeline folder: the given (or seeded random) UNet and VAE,
    two tiny CLIP text encoders over ``words``; returns the pipeline (its UNet names the
    cross-attention layers an IP-Adapter adds to)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok = clip_tokenizer(max_len, words)
    tok2 = clip_tokenizer(max_len, words)
    unet, vae, te, te2 = seeded_components(
        seed * 1000 + first,
        lambda: unet or UNet2DConditionModel(**unet_config),
        lambda: vae or AutoencoderKL(**vae_config),
        lambda: CLIPTextModel(clip_text_config(len(tok), tok.eos_token_id, tok.bos_token_id,
                                               hidden=SDXL_TE1_HIDDEN, heads=2,
                                               proj=SDXL_TE1_HIDDEN, max_len=max_len)),
        lambda: CLIPTextModelWithProjection(clip_text_config(
            len(tok2), tok2.eos_token_id, tok2.bos_token_id, hidden=SDXL_TE2_HIDDEN,
            heads=4, proj=SDXL_TE2_PROJ, max_len=max_len)))
    pipe = StableDiffusionXLPipeline(vae=vae.eval(), text_encoder=te.eval(),
                                     text_encoder_2=te2.eval(), tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet.eval(), scheduler=scheduler)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return pipe


# ----------------------------------------------------------------------------------------
# the tiny presets


def build_tiny_flux(path, seed: int = 0) -> str:
    """Write a tiny FLUX.1-dev-style diffusers pipeline folder to ``path``; return it."""
    return build_flux_pipeline(empty_target(path), tiny_flux_transformer_config(),
                               flux_vae_config(), seed=seed, first=1,
                               max_len=TINY_MAX_SEQUENCE_LENGTH)


def build_tiny_sdxl(path, seed: int = 0) -> str:
    """Write a tiny SDXL pipeline folder with an IP-Adapter inside it; return ``path``.

    The adapter loads with ``pipe.load_ip_adapter(path, **ip_kwargs)`` where ip_kwargs
    is ``sdxl_ip_adapter_kwargs(path)`` minus the path (see ``pipelines.tiny``).
    """
    from diffusers import EulerDiscreteScheduler
    from diffusers.models.embeddings import ImageProjection
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    path = empty_target(path)
    unet_cfg = tiny_sdxl_unet_config()
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", prediction_type="epsilon", interpolation_type="linear",
        use_karras_sigmas=False, timestep_spacing="leading", steps_offset=1)
    unet = build_sdxl_pipeline(path, unet_cfg, scheduler, seed=seed, first=11,
                               max_len=TINY_MAX_SEQUENCE_LENGTH,
                               vae_config=sdxl_vae_config()).unet

    # image encoder (CLIP vision tower with projection) + its preprocessor
    image_size = 32
    with seeded(seed * 1000 + 15):
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
    with seeded(seed * 1000 + 16):
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
# the story world's models
#
# FLUX: a real ``FluxPipeline`` folder with FluxTransformer2DModel + AutoencoderKL (4x
# downsampling: 64x64 images are 16x16 latents = 64 packed tokens) + the tiny text encoders,
# whose tokenizers also know the world's words (names, ``centre``) as whole tokens.  The text
# encoders stay at their seeded random weights (frozen everywhere): distinct prompts give
# distinct embeddings, which is all the denoiser needs.  The transformer has no guidance
# embedding (FLUX.1-schnell's layout): it is trained and sampled at one conditioning.

WORLD_MAX_SEQUENCE_LENGTH = 32
WORLD_WORDS = list(dict.fromkeys(WORDS + ["centre"] + [n.lower() for n in world_data.NAMES]
                                 + list(world_data.NAMES)))
# the world SDXL base also learns from captions that say a look (world_data.describe); its
# tokenizer reads those words whole (appended: the words before keep their ids and splits)
WORLD_SDXL_WORDS = list(dict.fromkeys(WORLD_WORDS + world_data.DESCRIPTION_WORDS))


def world_transformer_config() -> dict:
    return {
        "patch_size": 1,
        "in_channels": 64,              # 2x2 packed patches of 16 latent channels
        "out_channels": None,
        "num_layers": 2,
        "num_single_layers": 4,
        "attention_head_dim": 16,
        "num_attention_heads": 6,       # inner dim 96
        "joint_attention_dim": 32,      # T5 d_model
        "pooled_projection_dim": 32,    # CLIP hidden size
        "guidance_embeds": False,
        "axes_dims_rope": (4, 6, 6),
    }


def world_vae_config() -> dict:
    # the tiny preset's FLUX-style VAE (16 latent channels, scale factor 4)
    return flux_vae_config()


def build_world_pipeline(path, seed: int = 0, transformer=None, vae=None) -> str:
    """Write an untrained (or partly trained: pass ``transformer`` / ``vae``) world FLUX
    pipeline folder to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return build_flux_pipeline(path, world_transformer_config(), world_vae_config(), seed=seed,
                               first=101, max_len=WORLD_MAX_SEQUENCE_LENGTH, words=WORLD_WORDS,
                               transformer=transformer, vae=vae)


def world_sdxl_unet_config() -> dict:
    cfg = tiny_sdxl_unet_config()
    cfg.update(in_channels=16, out_channels=16, sample_size=16,   # the world VAE's latents
               # SDXL's own layout: no attention at the first (full-resolution) level, which
               # also makes a step ~2x cheaper here
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    return cfg


def build_world_sdxl_pipeline(path, vae, seed: int = 0, unet=None) -> str:
    """Write a world SDXL pipeline folder (untrained UNet unless ``unet`` is given)."""
    from diffusers import EulerDiscreteScheduler

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # SDXL's betas, rescaled to zero terminal SNR with v-prediction and "trailing" spacing
    # (Lin et al., 2023; diffusers supports all three): with SDXL's plain schedule the last
    # timestep keeps 7% of the image, so the frame's mean colour (here: the scene) comes from
    # the initial noise; an eps-trained base (2000 steps) drew the prompted scene at chance
    # (0.25 of 24 frames)
    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", prediction_type="v_prediction",
                                   timestep_spacing="trailing", rescale_betas_zero_snr=True)
    build_sdxl_pipeline(path, world_sdxl_unet_config(), sched, seed=seed, first=201,
                        max_len=WORLD_MAX_SEQUENCE_LENGTH, words=WORLD_SDXL_WORDS, unet=unet,
                        vae=vae)
    return str(path)


def images_to_tensor(images: Sequence) -> torch.Tensor:
    """uint8 HWC arrays / PIL images -> float32 [B, 3, H, W] in [-1, 1]."""
    import numpy as np

    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def tensor_to_uint8(x: torch.Tensor) -> List:
    """[B, 3, H, W] in [-1, 1] -> list of uint8 HWC arrays."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [im.permute(1, 2, 0).cpu().numpy() for im in x]
