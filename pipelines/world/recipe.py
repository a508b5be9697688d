"""The story world's training recipe: one table read by both ``python -m pipelines.train``
(its defaults when ``--model`` is not given, i.e. the committed world FLUX) and
``python -m pipelines.world_build build`` (the flags of its ``gsa`` and ``dpo`` stages), so the
two cannot drift apart.  It lives with the world, below both programs, because both read it.

Keys are the trainer's argument names (``args.<key>``).  ``max_steps`` is what a user's run
gets (sized for a CPU); the build passes its own step count and batch (``SETTINGS``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List

__all__ = ["WORLD_RECIPE", "WORLD_GROUPS", "WORLD_PER_GROUP", "recipe_argv", "world_gsa_data"]

# the world frames are 64x64 (pipelines.world.render.SIZE) and its prompts fit 32 T5 tokens
_COMMON: Dict[str, Any] = dict(resolution=64, max_sequence_length=32, num_refs=1,
                               cache_latents=True, gradient_checkpointing=False,
                               mixed_precision="no", log_every=10)

WORLD_RECIPE: Dict[str, Dict[str, Any]] = {
    # identity is undecided only at high noise: there the references are the only source of
    # it, so stage gsa trains mostly there (timestep shift 3)
    # two reference slots: a two-character frame reads both characters' references, each
    # inside its box (the data's "regions"); a lone frame reads one, the other slot empty
    "gsa": dict(_COMMON, num_refs=2, max_steps=300, batch_size=8, learning_rate=3e-3,
                lr_warmup_steps=20, timestep_shift=3.0, checkpoint_every=50),
    "dpo": dict(_COMMON, max_steps=60, batch_size=2, learning_rate=1e-4, beta=1000.0,
                checkpoint_every=20),
}

# stage gsa data: 240 groups of two training identities, each with its reference images and 6
# frames of one or both, every frame naming its characters' references and where they stand
# ("layout", data.make_cast_groups(layout=True)).  Measured against the earlier "lone" groups
# (one character per group, references drawn from the group) in docs/world.md: two-character
# frames go from a blend of both looks to each character's own.
WORLD_GROUPS, WORLD_PER_GROUP = 240, 6
WORLD_GSA_KIND = "layout"
_RECORD = "world_data.json"


def recipe_argv(stage: str, **override: Any) -> List[str]:
    """The recipe of ``stage`` as command-line flags (``override`` wins, by key)."""
    argv: List[str] = []
    for key, val in {**WORLD_RECIPE[stage], **override}.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(val, bool):
            argv.append(flag if val else "--no-" + key.replace("_", "-"))
        else:
            argv += [flag, str(val)]
    return argv


def world_gsa_data(dst, seed: int, n_groups: int = WORLD_GROUPS,
                   per_group: int = WORLD_PER_GROUP, kind: str = WORLD_GSA_KIND) -> Path:
    """Story groups of the world's training identities in ``dst``, made once: a folder that
    already holds the same (seed, groups, per group, kind) is reused.  ``kind``: ``lone``
    (:func:`data.make_gsa_groups`: one character per group, references drawn from the group)
    or ``cast`` (:func:`data.make_cast_groups`: two characters per group, every frame naming
    both reference frames).  Written to ``dst.tmp`` and renamed, so an interrupted run never
    leaves a half-made folder behind."""
    from . import data as WD

    if kind not in ("lone", "cast", "layout", "posed"):
        raise ValueError(f"kind {kind!r} is not 'lone', 'cast', 'layout' or 'posed'")
    dst = Path(dst)
    record = {"seed": seed, "n_groups": n_groups, "per_group": per_group, "kind": kind}
    rec = dst / _RECORD
    if (dst / "metadata.jsonl").is_file() and rec.is_file() \
            and json.loads(rec.read_text()) == record:
        return dst
    train, _ = WD.split_identities(seed)
    tmp = dst.parent / (dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if kind == "lone":
        WD.make_gsa_groups(tmp, n_groups=n_groups, per_group=per_group, seed=seed, pool=train)
    else:
        WD.make_cast_groups(tmp, n_groups=n_groups, per_group=per_group, seed=seed, pool=train,
                            layout=kind in ("layout", "posed"), posed=kind == "posed")
    (tmp / _RECORD).write_text(json.dumps(record) + "\n")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst
