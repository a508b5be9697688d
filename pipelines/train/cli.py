"""LoRA training for Group-Shared Attention (GSA) on FLUX.1 and FLUX.2 [klein]: stage ``gsa`` and ``dpo``.

    python -m pipelines.train --stage gsa [--model PATH|tiny] [--data DIR|synthetic] ...
    python -m pipelines.train --stage dpo --stage1-lora DIR_OR_FILE [--data pairs.jsonl] ...

Stage gsa (supervised): each sample is one target plus ``--num-refs`` references
drawn from the target's story group.  The rows of a sample form one GSA group
(target first): the target is noised at ``sigma`` ~ logit-normal, the references
enter clean (``sigma = 0``), and with ``storyattn.GroupSharedAttention`` in
in-batch mode the target attends to its own text+image tokens plus the
references' image tokens while each reference attends only to itself.  The
flow-matching loss (velocity ``noise - x0``) is taken on the target only.  A
LoRA (rank = alpha = 16 by default) on the FLUX blocks' linear layers is trained.

Stage dpo: the stage-1 LoRA is loaded as adapter ``gsa`` and frozen; a second,
zero-initialised adapter ``dpo`` is trained.  Policy = gsa + dpo, reference
policy = gsa alone.  Winner and loser of a pair share noise, sigma and the
references (one GSA group ``[winner, loser, refs...]`` with two targets).
Loss ``-log sigmoid(-beta/2 ((e_w - e_w_ref) - (e_l - e_l_ref)))``.

Without ``--model`` the stage trains the committed story-world FLUX
(``pipelines/world/weights/``) with the world recipe (:mod:`pipelines.world.recipe`, also what
``python -m pipelines.world_build build`` runs); without ``--data`` on world story groups it writes
to ``OUTPUT_DIR/world_data`` (gsa) or the committed preference pools (dpo), and for dpo
without ``--stage1-lora`` on the committed stage-1 LoRA; each default is announced.
``--model tiny`` (a random-weight FLUX built offline) with ``--data synthetic`` (the
default with it) is the quick preset of the tests; ``--model tiny-flux2`` the same on a
random-weight FLUX.2 [klein] (:mod:`pipelines.tiny_flux2`).

FLUX.2 [klein]: ``--model DIR`` with a ``Flux2KleinPipeline`` folder trains the same stages
on FLUX.2 (Qwen3 text, 2x2-patchified batch-normalised latents, 4-axis positions, all from
the pipeline's own helpers: :mod:`pipelines.flux2_inputs`), with LoRA targets on its modules
(:data:`pipelines.train.model.FLUX2_LORA_TARGET_REGEX`); the saved file loads with
``Flux2KleinPipeline.load_lora_weights``.

Outputs in ``--output-dir``: ``pytorch_lora_weights.safetensors`` (diffusers
format: ``FluxPipeline.load_lora_weights(OUT, adapter_name=...)``),
``metrics.jsonl`` (one line per step), ``checkpoints/checkpoint-N/`` (resume with
``--resume latest`` or ``--resume PATH``).  Every random draw of a step
(targets, references, caption dropout, noise, sigma) is a function of
``(seed, step, process index)``, so a resumed run reproduces the losses of an
uninterrupted one exactly.

Multi-process (DDP through accelerate)::

    accelerate launch --multi_gpu --num_processes N -m pipelines.train --stage gsa ...
    accelerate launch --multi_gpu --num_processes 2 -m pipelines.train --stage gsa --cpu ...
    torchrun --nproc_per_node 2 -m pipelines.train --stage gsa --cpu ...

On the CPU the processes talk over gloo (``accelerate launch --cpu`` alone starts
a single process).  ``--batch-size`` is per process; each process draws its own
samples (a function of the process index), and the logged values are averages
over processes.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Optional

from .. import quiet
from ..cli_common import UsageError
from .args import DEFAULTS, ConfigError, build_parser, resolve_args
from .checkpoints import CKPT_DIR, STATE_FILE, TRAINABLE_FILE, list_checkpoints, resolve_resume
from .trainer import Trainer

# what ``from pipelines.train import cli`` has always offered
__all__ = ["main", "build_parser", "resolve_args", "Trainer", "ConfigError", "DEFAULTS",
           "list_checkpoints", "resolve_resume", "STATE_FILE", "TRAINABLE_FILE", "CKPT_DIR"]


def main(argv=None) -> int:
    quiet.install()  # before diffusers/transformers import: some notices fire at import
    args = build_parser().parse_args(argv)
    out, existed = None, True
    try:
        args = resolve_args(args)
        out = Path(args.output_dir)
        existed = out.exists()
        Trainer(args).run()
    except UsageError as exc:  # ConfigError, DataError, ModelError: all user errors
        print(f"[train] error: {exc}", file=sys.stderr, flush=True)
        _abandon(out, existed)
        return 2
    except BaseException:
        _abandon(out, existed)
        raise
    return 0


def _abandon(out: Optional[Path], existed: bool) -> None:
    """A start that failed before its first checkpoint leaves no half-made folder."""
    if out is not None and not existed and out.is_dir() \
            and not any((out / CKPT_DIR).glob("checkpoint-*")):
        shutil.rmtree(out, ignore_errors=True)
