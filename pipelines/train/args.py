"""Command line of ``python -m pipelines.train``: the parser, stage-dependent defaults and
the range checks that run before any training starts."""
from __future__ import annotations

import argparse

from .. import flow_matching as L
from ..cli_common import DefaultsFormatter, OneLineParser, UsageError
from ..world.recipe import WORLD_RECIPE
from . import model as M

TINY = "tiny"             # --model tiny: the random-weight preset (pipelines.tiny)
TINY_FLUX2 = "tiny-flux2"  # --model tiny-flux2: the random-weight FLUX.2 klein (pipelines.tiny_flux2)
SYNTHETIC = "synthetic"   # --data synthetic: pipelines.train.synthetic

# the first line of the program's docstring (pipelines/train/cli.py)
DESCRIPTION = ("LoRA training for Group-Shared Attention (GSA) on FLUX.1 and FLUX.2 [klein]: "
               "stage ``gsa`` and ``dpo``.")

DEFAULTS = {
    # stage: (learning rate, max steps real, max steps synthetic)
    "gsa": (1e-4, 1000, 8),
    "dpo": (1e-5, 1000, 6),
}


# the generic defaults of the arguments the world recipe also sets (max_steps,
# checkpoint_every, learning_rate, resolution and max_sequence_length depend on more)
GENERIC = dict(batch_size=1, num_refs=2, lr_warmup_steps=0, timestep_shift=1.0,
               cache_latents=False, gradient_checkpointing=True, mixed_precision="auto",
               log_every=1)

EPILOG = """\
WORLD: the values used when --model is not given (the committed story-world FLUX in
pipelines/world/weights/flux): the world recipe of pipelines/world/recipe.py, which
`python -m pipelines.world_build build` trains with too.  An explicit --model gets the others."""


def _w(key: str) -> str:
    """The world recipe's value of ``key`` for the --help text (a stage's recipe that does
    not set it keeps the generic default)."""
    def fmt(v) -> str:
        if isinstance(v, bool):
            return "on" if v else "off"
        return f"{v:g}" if isinstance(v, float) else str(v)

    g, d = (WORLD_RECIPE[s].get(key, GENERIC.get(key)) for s in ("gsa", "dpo"))
    return fmt(g) if g == d else f"{fmt(g)} gsa / {fmt(d)} dpo"


class ConfigError(UsageError):
    """Bad command-line arguments; raised before training starts."""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m pipelines.train", description=DESCRIPTION,
                      epilog=EPILOG, formatter_class=DefaultsFormatter)
    p.add_argument("--stage", choices=["gsa", "dpo"], required=True)
    p.add_argument("--model", default=None,
                   help="local FLUX.1 (FluxPipeline) or FLUX.2 klein (Flux2KleinPipeline) "
                        "pipeline folder, or 'tiny' / 'tiny-flux2' (a tiny FLUX / FLUX.2 klein "
                        "with random weights built offline: shapes only, for tests); default: the "
                        "committed story-world FLUX (its values are marked WORLD)")
    p.add_argument("--data", default=None,
                   help="gsa: folder with metadata.jsonl; dpo: pairs.jsonl or its folder; "
                        "'synthetic': a small dataset written to OUTPUT_DIR/synthetic_data; "
                        "default: gsa: world story groups written once to OUTPUT_DIR/world_data, "
                        "dpo: the committed world preference pools (synthetic with --model tiny)")
    p.add_argument("--stage1-lora", default=None,
                   help="dpo: stage-1 LoRA (file or folder with pytorch_lora_weights.safetensors); "
                        "default with the world model: its committed stage-1 LoRA")
    p.add_argument("--output-dir", default=None, help="default: outputs/train_<stage>")
    p.add_argument("--max-steps", type=int, default=None,
                   help=f"optimizer steps (default 1000; 8 gsa / 6 dpo on synthetic data; "
                        f"WORLD {_w('max_steps')})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"samples (targets/pairs) per process (default 1; WORLD {_w('batch_size')})")
    p.add_argument("--num-refs", type=int, default=None,
                   help=f"references per sample (default 2; WORLD {_w('num_refs')})")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default = rank)")
    p.add_argument("--learning-rate", type=float, default=None,
                   help=f"AdamW learning rate (default 1e-4 gsa, 1e-5 dpo; "
                        f"WORLD {_w('learning_rate')})")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--lr-warmup-steps", type=int, default=None,
                   help=f"(default 0; WORLD {_w('lr_warmup_steps')})")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=1000.0, help="DPO beta")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help=f"save a resumable checkpoint every N steps, 0 = only at the end "
                        f"(default 500; 4 on synthetic data; WORLD {_w('checkpoint_every')})")
    p.add_argument("--checkpoints-total-limit", type=int, default=3,
                   help="keep at most this many checkpoints (0 = keep all)")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=None,
                   help="square training size in pixels (default 512, or the VAE's sample_size "
                        f"if smaller: 64 for the tiny model; WORLD {_w('resolution')})")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="text tokens (T5 on FLUX.1, Qwen3 on FLUX.2; default 512, or the "
                        "tokenizer's limit if smaller; 32 for tiny-flux2; "
                        f"WORLD {_w('max_sequence_length')})")
    p.add_argument("--caption-dropout", type=float, default=0.1,
                   help="gsa: probability of training a row with the empty caption")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="value fed to the guidance embedding (guidance-distilled models only)")
    p.add_argument("--timestep-scheme", choices=list(L.TIMESTEP_SCHEMES), default="logit_normal")
    p.add_argument("--logit-mean", type=float, default=0.0)
    p.add_argument("--logit-std", type=float, default=1.0)
    p.add_argument("--timestep-shift", type=float, default=None,
                   help=f"(default 1; WORLD {_w('timestep_shift')})")
    p.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"], default=None,
                   help=f"auto = bf16 on GPU, none (fp32) on CPU (default auto; "
                        f"WORLD {_w('mixed_precision')})")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--cache-latents", action=argparse.BooleanOptionalAction, default=None,
                   help=f"encode every image with the VAE once, before training (default off; "
                        f"WORLD {_w('cache_latents')})")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   default=None, help=f"(default on; WORLD {_w('gradient_checkpointing')})")
    p.add_argument("--log-every", type=int, default=None,
                   help=f"tqdm postfix refresh interval (default 1; WORLD {_w('log_every')})")
    return p


def resolve_args(args) -> argparse.Namespace:
    """Fill the model-, data- and stage-dependent defaults and check ranges."""
    args.world_model = args.model is None
    args.synthetic_model = args.model in (TINY, TINY_FLUX2)
    args.world_data = args.data is None and not args.synthetic_model
    args.synthetic_data = args.data == SYNTHETIC or (args.data is None and args.synthetic_model)
    _world_paths(args)
    table = {**GENERIC, **WORLD_RECIPE[args.stage]} if args.world_model else GENERIC
    for key, val in table.items():
        if getattr(args, key, None) is None:
            setattr(args, key, val)
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
    if not args.synthetic_model:
        M.check_model_path(args.model)
    return args


def _world_paths(args) -> None:
    """No --model: the committed world FLUX (and for dpo its stage-1 LoRA); no --data for
    dpo: the committed world preference pools.  Missing weights are a one-line error."""
    from ..world import weights as W

    def need(flag: str, fn):
        try:
            return fn()
        except FileNotFoundError as exc:
            raise ConfigError(f"no {flag} given and {exc} (or pass {flag}; --model tiny "
                              f"--data synthetic trains the random-weight preset)") from None

    args.world_stage1 = False
    if args.world_model:
        args.model = need("--model", W.flux_path)
        if args.stage == "dpo" and args.stage1_lora is None:
            args.stage1_lora = need("--stage1-lora", W.gsa_lora_path)
            args.world_stage1 = True
    if args.world_data and args.stage == "dpo":
        args.data = need("--data", W.dpo_data_path)
