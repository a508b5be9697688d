"""Command line of ``python -m pipelines.train``: the parser, stage-dependent defaults and
the range checks that run before any training starts."""
from __future__ import annotations

import argparse

from ..cli_common import DefaultsFormatter, OneLineParser
from . import losses as L
from . import model as M

# the first line of the program's docstring (pipelines/train/cli.py)
DESCRIPTION = "LoRA training for Group-Shared Attention (GSA) on FLUX.1: stage ``gsa`` and ``dpo``."

DEFAULTS = {
    # stage: (learning rate, max steps real, max steps synthetic)
    "gsa": (1e-4, 1000, 8),
    "dpo": (1e-5, 1000, 6),
}


class ConfigError(ValueError):
    """Bad command-line arguments; raised before training starts."""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m pipelines.train", description=DESCRIPTION,
                      formatter_class=DefaultsFormatter)
    p.add_argument("--stage", choices=["gsa", "dpo"], required=True)
    p.add_argument("--model", default=None,
                   help="local FLUX.1 pipeline folder; default: a tiny FLUX built offline")
    p.add_argument("--data", default=None,
                   help="gsa: folder with metadata.jsonl; dpo: pairs.jsonl or its folder; "
                        "default: a synthetic dataset written to OUTPUT_DIR/synthetic_data")
    p.add_argument("--stage1-lora", default=None,
                   help="dpo: stage-1 LoRA (file or folder with pytorch_lora_weights.safetensors)")
    p.add_argument("--output-dir", default=None, help="default: outputs/train_<stage>")
    p.add_argument("--max-steps", type=int, default=None,
                   help="optimizer steps (default 1000; 8 gsa / 6 dpo on synthetic data)")
    p.add_argument("--batch-size", type=int, default=1, help="samples (targets/pairs) per process")
    p.add_argument("--num-refs", type=int, default=2, help="references per sample")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default = rank)")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="AdamW learning rate (default 1e-4 gsa, 1e-5 dpo)")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--lr-warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=1000.0, help="DPO beta")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="save a resumable checkpoint every N steps (default 500; 4 on synthetic "
                        "data; 0 = only at the end)")
    p.add_argument("--checkpoints-total-limit", type=int, default=3,
                   help="keep at most this many checkpoints (0 = keep all)")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=None,
                   help="square training size in pixels (default 512, or the VAE's sample_size "
                        "if smaller: 64 for the tiny model)")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="T5 tokens (default 512, or the T5 tokenizer's limit if smaller)")
    p.add_argument("--caption-dropout", type=float, default=0.1,
                   help="gsa: probability of training a row with the empty caption")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="value fed to the guidance embedding (guidance-distilled models only)")
    p.add_argument("--timestep-scheme", choices=list(L.TIMESTEP_SCHEMES), default="logit_normal")
    p.add_argument("--logit-mean", type=float, default=0.0)
    p.add_argument("--logit-std", type=float, default=1.0)
    p.add_argument("--timestep-shift", type=float, default=1.0)
    p.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"], default="auto",
                   help="auto = bf16 on GPU, none (fp32) on CPU")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--cache-latents", action="store_true",
                   help="encode every image with the VAE once, before training")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing",
                   action="store_false")
    p.add_argument("--log-every", type=int, default=1, help="tqdm postfix refresh interval")
    return p


def resolve_args(args) -> argparse.Namespace:
    """Fill stage/synthetic-dependent defaults and check ranges."""
    args.synthetic_model = args.model is None
    args.synthetic_data = args.data is None
    lr, steps_real, steps_syn = DEFAULTS[args.stage]
    if args.learning_rate is None:
        args.learning_rate = lr
    if args.max_steps is None:
        args.max_steps = steps_syn if args.synthetic_data else steps_real
    if args.checkpoint_every is None:
        args.checkpoint_every = 4 if args.synthetic_data else 500
    if args.output_dir is None:
        args.output_dir = f"outputs/train_{args.stage}"
    for name, lo in (("max_steps", 1), ("batch_size", 1), ("num_refs", 1), ("rank", 1),
                     ("checkpoint_every", 0), ("lr_warmup_steps", 0), ("log_every", 1)):
        if getattr(args, name) < lo:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(args, name)}")
    if not args.learning_rate > 0:
        raise ConfigError(f"--learning-rate must be > 0, got {args.learning_rate}")
    if not 0.0 <= args.caption_dropout < 1.0:
        raise ConfigError(f"--caption-dropout must be in [0, 1), got {args.caption_dropout}")
    if args.stage == "dpo" and not args.beta > 0:
        raise ConfigError(f"--beta must be > 0, got {args.beta}")
    if args.stage == "gsa" and args.stage1_lora is not None:
        raise ConfigError("--stage1-lora is for --stage dpo")
    if args.stage == "dpo" and args.stage1_lora is None and not args.synthetic_model:
        raise ConfigError("--stage dpo with --model needs --stage1-lora (the stage gsa output)")
    if args.model is not None:
        M.check_model_path(args.model)
    return args
