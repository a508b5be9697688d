"""Draw K candidates per scenario with the stage-1 FLUX model.

::

    python -m pipelines.candidates --scenarios FILE [--out DIR] [-k K] [--model PATH]
        [--lora FILE ...] [--steps S] [--height H --width W] [--guidance G] [--seed S]
        [--batch-size B] [--device D] [--dtype T]

Per scenario its reference images are recorded once into a fresh
``storyattn.ReferenceKVCache`` (one transformer forward at timestep 0, Group-Shared
Attention's record mode) and the K candidates are drawn reading that cache (replay mode):
the same path Story-Iter's FLUX backbone takes for a round.  Candidate ``k`` of scenario
``s`` uses its own seed (recorded in ``candidates.json``), so a candidate does not depend
on the batch it was drawn in.

Output (the folder the studio labels)::

    OUT/candidates.json          format, config, and per scenario: prompt, characters,
                                 references and candidates (file + seed)
    OUT/<id>/ref_00.png ...      the references, copied so the set is self-contained
    OUT/<id>/cand_00.png ...     each written atomically as soon as it is drawn

Rerunning the same command resumes with the first missing candidate.  With no
``--model`` the story world's FLUX model (``pipelines/world/weights``) draws, with its
committed stage-1 LoRA unless ``--lora`` names others, at the world's 64x64 and 20 steps;
``--model tiny`` builds the tiny FLUX preset offline (random weights: a plumbing demo).
"""
from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path
from typing import List, Optional

from pipelines.candidates.scenarios import Scenario, ScenarioError, load_scenarios

__all__ = ["main", "build_parser", "candidate_seed", "FORMAT", "MANIFEST"]

FORMAT = "storyattn.candidates/1"
MANIFEST = "candidates.json"
TINY = dict(steps=4, height=64, width=64)
WORLD = dict(steps=20, height=64, width=64)      # the world model's sampling setting
FULL = dict(steps=28, height=1024, width=1024)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m pipelines.candidates",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="K candidates per scenario, drawn with the stage-1 FLUX model attending to "
                    "the scenario's reference images (Group-Shared Attention from a reference "
                    "KV cache). Output: a candidate set for `python -m pipelines.studio`.",
        epilog="""examples:
  python -m pipelines.candidates --scenarios scenarios.json --out sets/a -k 8
  python -m pipelines.candidates --scenarios s.json --model /models/flux1-dev \\
      --lora outputs/train_gsa/pytorch_lora_weights.safetensors --out sets/b
Rerun the same command to resume. Format of the scenarios file: docs/candidates.md.""")
    ap.add_argument("--scenarios", required=True, help="scenarios JSON (docs/candidates.md)")
    ap.add_argument("--out", default="outputs/candidates", help="output folder (a candidate set)")
    ap.add_argument("-k", "--candidates", type=int, default=4, help="candidates per scenario")
    ap.add_argument("--model", help="local FLUX pipeline folder, or 'tiny' for the tiny offline "
                                    "preset (default: the story world's model)")
    ap.add_argument("--lora", nargs="*", default=None,
                    help="LoRA .safetensors file(s), e.g. stage 1 (default with no --model: the "
                         "world's committed stage-1 LoRA; else none)")
    ap.add_argument("--steps", type=int, help="denoising steps (default 28; world 20; tiny 4)")
    ap.add_argument("--height", type=int, help="default 1024; world and tiny 64")
    ap.add_argument("--width", type=int, help="default 1024; world and tiny 64")
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--seed", type=int, default=0, help="base seed; per-candidate seeds derive from it")
    ap.add_argument("--batch-size", type=int, default=4, help="candidates drawn per forward")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--no-step-progress", action="store_true", help="hide the per-step bar")
    return ap


def candidate_seed(base: int, scenario_id: str, k: int) -> int:
    """Seed of candidate ``k`` of a scenario: a pure function of (base, id, k)."""
    import numpy as np

    rng = np.random.default_rng([int(base), zlib.crc32(scenario_id.encode()), int(k)])
    return int(rng.integers(0, 2**31 - 1))


class UserError(Exception):
    pass


def _config_matches(model: str, want: dict) -> bool:
    """Whether the folder's transformer has every key of ``want`` (a preset's config)."""
    import json

    try:
        cfg = json.loads((Path(model) / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return all(cfg.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in want.items())


def _preset_sizes(model: str):
    """Sizes for a model folder: the tiny preset's and the world's architectures (whatever
    weights they hold, e.g. a build's ``base/``) get their own, anything else FLUX's."""
    from pipelines.tiny import tiny_flux_transformer_config
    from pipelines.world.models import world_transformer_config

    if _config_matches(model, tiny_flux_transformer_config()):
        return "tiny", TINY
    if _config_matches(model, world_transformer_config()):
        return "world", WORLD
    return None, FULL


def _resolve(args) -> dict:
    import torch

    if args.candidates < 1:
        raise UserError(f"-k must be at least 1, got {args.candidates}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    notes = []
    lora_args = args.lora if args.lora is not None else []
    world = None
    if args.model is None:
        from pipelines.world import weights as W

        world = W.available()
    if args.model == "tiny" or (args.model is None and not world):
        from pipelines.tiny import get_tiny_flux

        model = get_tiny_flux()
        notes.append(f"{'--model tiny' if args.model else 'no --model and no world weights'}: "
                     f"the tiny FLUX preset built offline ({model}); random weights, so the "
                     "pictures are noise-like")
        sizes = TINY
    elif args.model is None:
        model = W.flux_path()
        if args.lora is None:
            lora_args = [W.gsa_lora_path()]
        notes.append(f"no --model: the story world's FLUX model ({model}) with "
                     + ("its committed stage-1 LoRA" if args.lora is None else "--lora")
                     + f"; defaults {WORLD}")
        sizes = WORLD
    else:
        model = str(Path(args.model).resolve())
        if not (Path(model) / "model_index.json").is_file():
            raise UserError(f"--model {args.model}: no model_index.json there; pass a local "
                            "diffusers FLUX pipeline folder (or 'tiny')")
        kind, sizes = _preset_sizes(model)
        if kind:
            notes.append(f"--model {args.model} has the {kind} architecture: defaults {sizes}")
    loras = []
    for lora in lora_args:
        p = Path(lora)
        if p.is_dir():
            p = p / "pytorch_lora_weights.safetensors"
        if not p.is_file():
            raise UserError(f"--lora {lora}: file not found; pass a .safetensors file or a "
                            "training output folder")
        loras.append(str(p.resolve()))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    cfg = {"model": model, "loras": loras, "candidates": args.candidates, "seed": args.seed,
           "steps": args.steps or sizes["steps"], "height": args.height or sizes["height"],
           "width": args.width or sizes["width"], "guidance": args.guidance}
    for name in ("height", "width"):
        if cfg[name] % 16:
            raise UserError(f"--{name} {cfg[name]} must be a multiple of 16 (FLUX packs 2x2 "
                            "latent patches)")
    return {"config": cfg, "device": device, "dtype": dtype, "notes": notes}


def _manifest(cfg: dict, scenarios: List[Scenario]) -> dict:
    entries = []
    for s in scenarios:
        entries.append({
            **s.as_dict(),
            "references": [f"{s.id}/ref_{j:02d}.png" for j in range(len(s.references))],
            "candidates": [{"file": f"{s.id}/cand_{k:02d}.png",
                            "seed": candidate_seed(cfg["seed"], s.id, k)}
                           for k in range(cfg["candidates"])],
        })
    return {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": cfg,
            "scenarios": entries, "status": "running"}


def _prepare_out(out: Path, manifest: dict) -> Optional[dict]:
    """Existing set: the same config and scenarios resume it; anything else is refused."""
    from pipelines.story_iter.report import read_json

    path = out / MANIFEST
    if not path.is_file():
        if out.exists() and any(out.iterdir()):
            raise UserError(f"--out {out} exists, is not empty and holds no {MANIFEST}; choose "
                            "an empty or new folder")
        return None
    old = read_json(path)
    if (old.get("format") != FORMAT or old.get("config") != manifest["config"]
            or old.get("scenarios") != manifest["scenarios"]):
        raise UserError(f"{out} holds a candidate set made with other settings or scenarios; "
                        "rerun with the same arguments to resume, or choose another --out")
    return old


def _copy_references(out: Path, s: Scenario) -> List:
    from PIL import Image

    from pipelines.story_iter.report import save_png_atomic

    images = []
    for j, src in enumerate(s.references):
        with Image.open(src) as im:
            im = im.convert("RGB")
        dst = out / s.id / f"ref_{j:02d}.png"
        if not dst.is_file():
            save_png_atomic(im, dst)
        images.append(im)
    return images


def _fmt_s(sec: float) -> str:
    sec = int(round(sec))
    return f"{sec // 3600}h{sec % 3600 // 60:02d}m" if sec >= 3600 else f"{sec // 60}m{sec % 60:02d}s"


def run(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from pipelines.story_iter.backbone_flux import FluxBackbone
    from pipelines.story_iter.cli import _quiet_prompt_truncation
    from pipelines.story_iter.report import atomic_write_json, save_png_atomic

    scenarios = load_scenarios(args.scenarios)
    plan = _resolve(args)
    cfg = plan["config"]
    out = Path(args.out).resolve()
    manifest = _manifest(cfg, scenarios)
    old = _prepare_out(out, manifest)
    if old is not None:
        manifest["created"] = old.get("created", manifest["created"])
    for note in plan["notes"]:
        print(note, flush=True)
    todo = {s.id: [c for c in e["candidates"] if not (out / c["file"]).is_file()]
            for s, e in zip(scenarios, manifest["scenarios"])}
    n_todo = sum(len(v) for v in todo.values())
    total = len(scenarios) * cfg["candidates"]
    print(f"plan: {len(scenarios)} scenario(s) x {cfg['candidates']} candidate(s) = {total} "
          f"images at {cfg['width']}x{cfg['height']}, {cfg['steps']} steps, on {plan['device']} "
          f"({plan['dtype']}); {total - n_todo} already done, {n_todo} to draw -> {out}",
          flush=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / MANIFEST, manifest)
    if n_todo:
        t0 = time.perf_counter()
        bb = FluxBackbone(cfg["model"], cfg["loras"], plan["device"], getattr(torch, plan["dtype"]),
                          cfg["height"], cfg["width"], cfg["steps"], cfg["guidance"],
                          step_progress=not args.no_step_progress, record_batch=args.batch_size)
        bb.load()
        _quiet_prompt_truncation()
        print(f"loaded {cfg['model']} (+{len(cfg['loras'])} LoRA) in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        bar = tqdm(total=n_todo, desc="candidates", unit="img")
        done, t_draw = 0, time.perf_counter()
        for s, entry in zip(scenarios, manifest["scenarios"]):
            if not todo[s.id]:
                continue
            refs = _copy_references(out, s)
            # one cache per scenario: its references recorded once, read by every candidate
            bb.begin_round(refs, 0.0, ref_prompts=s.ref_prompts())
            try:
                cands = entry["candidates"]
                for b in range(0, len(cands), args.batch_size):
                    chunk = cands[b:b + args.batch_size]
                    missing = [c for c in chunk if not (out / c["file"]).is_file()]
                    if not missing:
                        continue
                    # a partly written batch is drawn whole (same batch, same numbers), so a
                    # resumed set is bit-identical to an uninterrupted one
                    gens = [torch.Generator("cpu").manual_seed(c["seed"]) for c in chunk]
                    for c, img in zip(chunk, bb.draw([s.prompt] * len(chunk), gens)):
                        if c in missing:
                            save_png_atomic(img, out / c["file"])
                    done += len(missing)
                    bar.update(len(missing))
            finally:
                bb.end_round()
            rate = (time.perf_counter() - t_draw) / done
            bar.write(f"scenario {s.id}: {cfg['candidates']} candidates; {done}/{n_todo} drawn, "
                      f"ETA {_fmt_s(rate * (n_todo - done))}")
        bar.close()
    for s in scenarios:  # references of scenarios that were complete before (resume)
        _copy_references(out, s)
    manifest["status"] = "complete"
    atomic_write_json(out / MANIFEST, manifest)
    print(f"done: {total} candidates in {out} (label them: python -m pipelines.studio "
          f"{out.parent})", flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (UserError, ScenarioError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
