"""Tiny FLUX.2 [klein] preset, built offline with random weights.

Written in the layout of the real klein checkpoints, so tests, demos and benchmarks load
it with the code a user runs on real weights::

    Flux2KleinPipeline.from_pretrained(path)      # or Flux2KleinKVPipeline.from_pretrained(path)

Nothing is downloaded: the Qwen3 tokenizer is a byte-level BPE built here from the
word list of :mod:`pipelines.tiny` (Qwen's special tokens and a chat template with the
``enable_thinking`` switch the pipelines pass), every model is initialised from a fixed
seed, and two builds with the same seed are bit-identical.

Layout::

    path/model_index.json     Flux2KleinPipeline (is_distilled=True, as klein-4B/9B)
    path/transformer/         Flux2Transformer2DModel (tiny_flux2_transformer_config())
    path/vae/                 AutoencoderKLFlux2: 8 latent channels (32 after the 2x2
                              patchify), scale factor 4, batch-norm statistics that are
                              not the identity (so latent normalisation is exercised)
    path/text_encoder/        Qwen3ForCausalLM: 27 layers (the pipelines read hidden
                              states 9, 18 and 27) of width 16
    path/tokenizer/           Qwen2TokenizerFast (byte-level BPE, chat template)
    path/scheduler/           FlowMatchEulerDiscreteScheduler (klein config)

Call the pipelines with ``height=width=64`` (8x8 = 64 image tokens) and
``max_sequence_length=TINY_FLUX2_MAX_SEQUENCE_LENGTH`` (32): the defaults (1024^2
images, 512 text tokens) work but are needlessly slow.

The cached preset is :func:`pipelines.tiny.get_tiny_flux2` (``<root>/tiny-flux2-v1``, the
same cache as the FLUX.1 and SDXL presets); this module only builds.
"""
from __future__ import annotations

from .model_presets import WORDS, bpe_merge, byte_to_unicode, empty_target, seeded

__all__ = ["build_tiny_flux2", "tiny_flux2_transformer_config",
           "TINY_FLUX2_MAX_SEQUENCE_LENGTH"]

TINY_FLUX2_MAX_SEQUENCE_LENGTH = 32

_TEXT_HIDDEN = 16
_TEXT_LAYERS = 27  # Flux2Klein*Pipeline stack hidden states (9, 18, 27) by default
_LATENT_CHANNELS = 8

# Qwen3's special tokens, in the order the real vocabulary lists them after the BPE part.
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen3's chat template reduced to what the klein pipelines use: one user message, the
# generation prompt, and the empty think block that enable_thinking=False adds.
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def tiny_flux2_transformer_config() -> dict:
    """Config of the tiny Flux2Transformer2DModel (klein layout: no guidance embedding)."""
    return {
        "patch_size": 1,
        "in_channels": 4 * _LATENT_CHANNELS,  # 2x2 patchified VAE latents
        "out_channels": None,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 3 * _TEXT_HIDDEN,  # three stacked Qwen3 hidden states
        "timestep_guidance_channels": 32,
        "mlp_ratio": 3.0,
        "axes_dims_rope": (4, 4, 4, 4),  # (T, H, W, L); sums to attention_head_dim
        "rope_theta": 2000,
        "eps": 1e-6,
        "guidance_embeds": False,
    }


def _vae_config() -> dict:
    return {
        "in_channels": 3, "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "block_out_channels": (16, 32, 32),
        "layers_per_block": 1,
        "latent_channels": _LATENT_CHANNELS,
        "norm_num_groups": 8,
        "sample_size": 64,
        "use_quant_conv": True, "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }


def _build_qwen_tokenizer(model_max_length: int, words=None):
    """A Qwen2 tokenizer (byte-level BPE, 'Ġ' marks a leading space) knowing every word
    of the list, with and without a leading space, as one token; other text falls back
    to byte pieces, so every prompt tokenizes."""
    from transformers import Qwen2TokenizerFast

    to_uni = byte_to_unicode()
    vocab: dict = {}
    for b in range(256):
        vocab[to_uni[b]] = len(vocab)
    merges, ranks = [], {}
    for word in words or WORDS:
        for form in (word, " " + word):
            symbols = [to_uni[b] for b in form.encode("utf-8")]
            # add the first pair's merge until the form is one token: merges added later
            # rank higher, so they never change how earlier forms split
            while True:
                split = bpe_merge(symbols, ranks)
                if len(split) == 1:
                    break
                pair = (split[0], split[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
    for tok in _SPECIALS:
        vocab[tok] = len(vocab)
    tok = Qwen2TokenizerFast(vocab=vocab, merges=merges,
                             unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                             additional_special_tokens=_SPECIALS[1:],
                             model_max_length=model_max_length)
    tok.chat_template = _CHAT_TEMPLATE
    return tok


def build_tiny_flux2(path, seed: int = 0) -> str:
    """Write a tiny FLUX.2 [klein] diffusers pipeline folder to ``path``; return it."""
    import torch
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                           Flux2Transformer2DModel)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = empty_target(path)
    tokenizer = _build_qwen_tokenizer(512)
    with seeded(seed):
        transformer = Flux2Transformer2DModel(**tiny_flux2_transformer_config())
        vae = AutoencoderKLFlux2(**_vae_config())
        # batch-norm statistics of a trained VAE are not (0, 1): make them matter here
        vae.bn.running_mean.copy_(0.2 * torch.randn(vae.bn.running_mean.shape))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape))
        text_config = Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=_TEXT_HIDDEN, intermediate_size=32,
            num_hidden_layers=_TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1,
            head_dim=8, max_position_embeddings=512, tie_word_embeddings=True,
            bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id)
        text_encoder = Qwen3ForCausalLM(text_config)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder.eval(),
                              tokenizer=tokenizer, transformer=transformer.eval(), is_distilled=True)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return str(path)
