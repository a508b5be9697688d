"""Resumable checkpoints of ``python -m pipelines.train``: where they live, which one
``--resume`` means, and what one holds (accelerate's optimizer/scheduler/RNG state, the
trainable LoRA only, never the base model, and ``training_state.json``)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List, Optional

import torch

from . import model as M
from .args import ConfigError
from .log import say

STATE_FILE = "training_state.json"
TRAINABLE_FILE = "trainable_lora.safetensors"
CKPT_DIR = "checkpoints"


def list_checkpoints(output_dir: Path) -> List[Path]:
    root = output_dir / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("checkpoint-") and (d / STATE_FILE).is_file():
            try:
                found.append((int(d.name.split("-", 1)[1]), d))
            except ValueError:
                continue
    return [d for _, d in sorted(found)]


def resolve_resume(resume: Optional[str], output_dir: Path) -> Optional[Path]:
    if resume is None:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    p = Path(resume)
    if not (p / STATE_FILE).is_file():
        raise ConfigError(f"--resume {p}: not a checkpoint folder (no {STATE_FILE})")
    return p


def save_checkpoint(acc, out: Path, step: int, args) -> None:
    """``OUT/checkpoints/checkpoint-STEP``; the oldest beyond ``--checkpoints-total-limit`` go."""
    d = out / CKPT_DIR / f"checkpoint-{step}"
    acc.save_state(str(d))
    if acc.is_main_process:
        state = {"step": step, "stage": args.stage, "seed": args.seed,
                 "num_processes": acc.num_processes, "batch_size": args.batch_size,
                 "num_refs": args.num_refs, "rank": args.rank,
                 "sampler_next_slot": (step * acc.num_processes) * args.batch_size}
        (d / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        limit = args.checkpoints_total_limit
        ckpts = list_checkpoints(out)
        if limit > 0 and len(ckpts) > limit:
            for old in ckpts[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def resume(acc, args, out: Path) -> int:
    """Load ``--resume``'s checkpoint into ``acc``'s registered state; the step to start at."""
    ckpt = resolve_resume(args.resume, out)
    if ckpt is None:
        if args.resume == "latest":
            say(acc, f"--resume latest: no checkpoint in {out / CKPT_DIR}; starting at step 0")
        return 0
    state = json.loads((ckpt / STATE_FILE).read_text())
    if state.get("stage") != args.stage:
        raise ConfigError(f"checkpoint {ckpt} is from stage {state.get('stage')}, not {args.stage}")
    for key, cur in (("seed", args.seed), ("num_processes", acc.num_processes),
                     ("batch_size", args.batch_size), ("num_refs", args.num_refs)):
        if state.get(key) != cur:
            say(acc, f"warning: checkpoint {key}={state.get(key)} but this run has {cur}: the "
                     f"continuation will not match an uninterrupted run")
    acc.load_state(str(ckpt))
    say(acc, f"resumed from {ckpt} at step {state['step']}")
    return int(state["step"])


# accelerate's save/load pre-hooks: checkpoints hold only the trainable LoRA, never the base model


def save_trainable(acc, model, adapter: str, weights, output_dir) -> None:
    from safetensors.torch import save_file

    if acc.is_main_process:
        tr = acc.unwrap_model(model)
        sd = {n: p.detach().cpu().contiguous() for n, p in M.adapter_params(tr, adapter).items()}
        save_file(sd, str(Path(output_dir) / TRAINABLE_FILE))
    while weights:
        weights.pop()


def load_trainable(acc, model, adapter: str, models, input_dir) -> None:
    from safetensors.torch import load_file

    while models:
        models.pop()
    sd = load_file(str(Path(input_dir) / TRAINABLE_FILE))
    params = M.adapter_params(acc.unwrap_model(model), adapter)
    if set(sd) != set(params):
        raise ConfigError(f"checkpoint {input_dir} was written for other LoRA layers "
                          f"(different --rank/--stage/model?)")
    with torch.no_grad():
        for n, p in params.items():
            if sd[n].shape != p.shape:
                raise ConfigError(f"checkpoint {input_dir}: {n} has shape {tuple(sd[n].shape)}, "
                                  f"the model needs {tuple(p.shape)} (different --rank?)")
            p.copy_(sd[n].to(p.dtype))
