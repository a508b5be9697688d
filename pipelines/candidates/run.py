"""Plan and draw a candidate set (``python -m pipelines.candidates``; the command line is
``cli.py``): the model and sizes, the output folder (new or resumed), then per scenario one
reference cache and K candidates drawn from it."""
from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

from .. import quiet
from ..candidate_sets import FORMAT, MANIFEST, new_manifest
from ..cli_common import UsageError
from ..run_folder import atomic_write_json, read_json, save_png_atomic
from .scenarios import Scenario, load_scenarios

__all__ = ["run"]

TINY = dict(steps=4, height=64, width=64)
WORLD = dict(steps=20, height=64, width=64)      # the world model's sampling setting
FULL = dict(steps=28, height=1024, width=1024)


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
    from pipelines.model_presets import world_transformer_config

    if _config_matches(model, tiny_flux_transformer_config()):
        return "tiny", TINY
    if _config_matches(model, world_transformer_config()):
        return "world", WORLD
    return None, FULL


def _resolve(args) -> dict:
    import torch

    if args.candidates < 1:
        raise UsageError(f"-k must be at least 1, got {args.candidates}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
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
            raise UsageError(f"--model {args.model}: no model_index.json there; pass a local "
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
            raise UsageError(f"--lora {lora}: file not found; pass a .safetensors file or a "
                            "training output folder")
        loras.append(str(p.resolve()))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    cfg = {"model": model, "loras": loras, "candidates": args.candidates, "seed": args.seed,
           "steps": args.steps or sizes["steps"], "height": args.height or sizes["height"],
           "width": args.width or sizes["width"], "guidance": args.guidance}
    for name in ("height", "width"):
        if cfg[name] % 16:
            raise UsageError(f"--{name} {cfg[name]} must be a multiple of 16 (FLUX packs 2x2 "
                            "latent patches)")
    return {"config": cfg, "device": device, "dtype": dtype, "notes": notes}


def _prepare_out(out: Path, manifest: dict) -> Optional[dict]:
    """Existing set: the same config and scenarios resume it; anything else is refused."""
    path = out / MANIFEST
    if not path.is_file():
        if out.exists() and any(out.iterdir()):
            raise UsageError(f"--out {out} exists, is not empty and holds no {MANIFEST}; choose "
                            "an empty or new folder")
        return None
    old = read_json(path)
    if (old.get("format") != FORMAT or old.get("config") != manifest["config"]
            or old.get("scenarios") != manifest["scenarios"]):
        raise UsageError(f"{out} holds a candidate set made with other settings or scenarios; "
                        "rerun with the same arguments to resume, or choose another --out")
    return old


def _copy_references(out: Path, s: Scenario) -> List:
    from PIL import Image

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

    from pipelines.backbones.flux import FluxBackbone

    scenarios = load_scenarios(args.scenarios)
    plan = _resolve(args)
    cfg = plan["config"]
    out = Path(args.out).resolve()
    manifest = new_manifest(cfg, scenarios)
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
        quiet.prompt_truncation()
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
            every = list(range(len(refs)))
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
                    # with regions, each candidate reads each reference inside its box
                    where = ([[every] * len(chunk), [s.regions] * len(chunk)] if s.regions
                             else [])
                    for c, img in zip(chunk, bb.draw([s.prompt] * len(chunk), gens, *where)):
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
