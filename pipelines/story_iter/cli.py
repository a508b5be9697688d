"""Story-Iter: iterative story visualization over R rounds x N frames.

::

    python -m pipelines.story_iter [--story FILE] [--backbone sdxl|flux] [--model PATH]
        [--ip-adapter PATH] [--image-encoder PATH] [--lora PATH ...] [--frames N]
        [--rounds R] [--steps S] [--guidance G] [--scales A:B] [--seed S]
        [--batch-size B] [--height H --width W] [--out DIR] [--device D] [--dtype T]
        [--refs all|topk:K|window:W]

Round 0 draws every frame from its prompt alone; round r = 1..R draws every frame again
while it attends to the frames of round r-1:

* ``sdxl`` (the published method): SDXL + IP-Adapter; Global Reference Cross-Attention
  over all N frames (4 tokens each), weight ``scale_r = linspace(A, B, R)[r-1]``.
* ``flux``: FLUX + Group-Shared Attention replaying a ``ReferenceKVCache`` recorded from
  round r-1's frames at timestep 0; ``--refs`` picks each frame's references.

With no ``--model`` it runs the built-in 100-frame demo (a snowman who meets a fox) on a
tiny model with random weights that it builds offline, with fewer rounds and steps than
the published defaults (it says so when it starts).  Real weights come from local paths.

Before any weight loads it prints the plan (every setting, and whether it resumes); a
user's mistake is one line on stderr with exit code 2.  Outputs (``--out``):
``round_XX/frame_YYY.png`` (written atomically when their batch finishes),
``manifest.json``, ``index.html``; ``.lock`` while a run owns the folder.  Ctrl-C stops
after marking the manifest "interrupted"; rerunning the same command resumes with the
first unfinished frame.  Under ``accelerate launch`` (or ``torchrun``) each process draws
its share of every round (whole batches, so the result equals a single-process run).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .. import quiet
from ..cli_common import OneLineParser, UsageError, report_usage_error
from .outdir import ResumeRefused, abandon, frames_on_disk, prepare_out
from .plan import DEMO, PUBLISHED, check_device, format_plan, parse_refs, plan_rows, resolve

__all__ = ["main", "build_parser", "select_refs", "parse_refs", "round_scales", "DEMO"]

PROG = "python -m pipelines.story_iter"

# The round's per-process stats land here and are merged by the main process.
_STATS_NAME = "_stats_rank{rank}.json"

# Test hook: stop this process after it has written this many frames (simulates a kill
# at a frame boundary; a real kill can land anywhere, which the atomic writes cover).
STOP_ENV = "STORYATTN_STOP_AFTER_FRAMES"


# ------------------------------------------------------------------------------------------
# arguments


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Story-Iter: R rounds x N frames of a story, each round attending to the "
                    "previous one. No arguments: the built-in demo on a tiny offline model.",
        epilog="""examples:
  python -m pipelines.story_iter                       # built-in demo, tiny offline SDXL
  python -m pipelines.story_iter --backbone flux       # the same on the tiny FLUX preset
  python -m pipelines.story_iter --story my.json --model /models/sdxl \\
      --ip-adapter /models/ip/sdxl_models/ip-adapter_sdxl.safetensors --out runs/my
  python -m pipelines.story_iter --backbone flux --model /models/flux1-dev \\
      --lora stage1.safetensors stage2.safetensors --refs topk:3 --out runs/flux
  accelerate launch --multi_gpu --num_processes 2 -m pipelines.story_iter ...
      (each process draws its share of every round; also works on CPU, with gloo)
Rerun the same command to resume an interrupted run.""")
    ap.add_argument("--story", help="story JSON (default: the built-in 100-frame demo)")
    ap.add_argument("--backbone", choices=["sdxl", "flux"], default="sdxl")
    ap.add_argument("--model", help="local diffusers pipeline folder (default: tiny offline "
                                    "preset, random weights)")
    ap.add_argument("--ip-adapter", help="SDXL: local IP-Adapter weights file")
    ap.add_argument("--image-encoder", help="SDXL: CLIP image encoder folder (default: "
                                            "image_encoder/ next to the adapter file)")
    ap.add_argument("--lora", nargs="+", default=[], metavar="PATH",
                    help="LoRA files to load with pipe.load_lora_weights (e.g. GSA stage 1 and "
                         "stage 2)")
    ap.add_argument("--frames", type=int, help="use the first N frames of the story")
    ap.add_argument("--rounds", type=int, help="refinement rounds R after round 0 "
                                               f"(published: {PUBLISHED['rounds']})")
    ap.add_argument("--steps", type=int, help=f"denoising steps (published: {PUBLISHED['steps']})")
    ap.add_argument("--guidance", type=float, help="guidance scale (sdxl: CFG, default 5.0; "
                                                   "flux: distilled guidance, default 3.5)")
    ap.add_argument("--scales", help="A:B, reference weight of round r = linspace(A, B, R) "
                                     "(default 0.3:0.5)")
    ap.add_argument("--seed", type=int, help="seed of every frame's generator (default 0)")
    ap.add_argument("--seed-per-frame", action="store_true",
                    help="seed frame i with seed + i instead of one seed for all frames")
    ap.add_argument("--batch-size", type=int, help="frames per denoising batch")
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--refs", default="all",
                    help="references per frame: all | topk:K (frames sharing most characters, "
                         "ties by distance) | window:W (the W nearest frames)")
    ap.add_argument("--out", help="output folder (default: story_iter_out/<title>-<backbone>)")
    ap.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                    help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--max-memory", type=float, metavar="GiB",
                    help="memory available to the run (default: measured free memory)")
    ap.add_argument("--no-step-progress", action="store_true", help="hide the per-step bar")
    from pipelines.vistorybench import cli_hooks as vistorybench

    from . import presets

    presets.add_arguments(ap)
    vistorybench.add_arguments(ap)
    return ap


def select_refs(story, target: int, spec: str, n_frames: Optional[int] = None) -> List[int]:
    """Frames of the previous round that ``target`` reads (its own frame included).

    ``all``: every frame.  ``topk:K``: the K frames sharing the most characters with the
    target; ties go to the nearer frame, then the earlier one.  ``window:W``: the W frames
    nearest in the story (earlier first on ties)."""
    n = len(story.frames) if n_frames is None else n_frames
    kind, k = parse_refs(spec)
    if kind == "all":
        return list(range(n))
    if kind == "window":
        order = sorted(range(n), key=lambda i: (abs(i - target), i))
        return sorted(order[:k])
    mine = set(story.frames[target].characters)
    order = sorted(range(n), key=lambda i: (-len(mine & set(story.frames[i].characters)),
                                            abs(i - target), i))
    return sorted(order[:k])


def round_scales(a: float, b: float, rounds: int) -> List[float]:
    """Reference weight per round 0..R: round 0 has none; rounds 1..R linspace(a, b, R)."""
    if rounds <= 0:
        return [0.0]
    if rounds == 1:
        return [0.0, float(a)]
    return [0.0] + [a + (b - a) * i / (rounds - 1) for i in range(rounds)]


def frame_seed(cfg: Dict[str, Any], i: int) -> int:
    return cfg["seed"] + i if cfg["seed_per_frame"] else cfg["seed"]


# ------------------------------------------------------------------------------------------
# the run


def _round_refs(story, r: int, out: Path, n: int, spec: str, char_images: List,
                char_owner: List[str], texts: List[str], round0_chars: bool = False):
    """References of round r: the N frames of round r-1 (read back from disk, so a resumed
    run sees exactly the same pixels) followed by the story's character images; their
    prompts (``texts``: the frames'); and per frame the entries it reads (None = all).
    Round 0 has none, or with ``round0_chars`` (--round0-refs characters) every character
    image for every frame."""
    from PIL import Image

    from pipelines.story_iter.report import frame_path

    if r == 0:
        if not (round0_chars and char_images):
            return [], [], None
        return list(char_images), _char_prompts(story, char_owner), None
    refs, prompts = [], []
    for i in range(n):
        with Image.open(frame_path(out, r - 1, i)) as im:
            refs.append(im.convert("RGB"))
        prompts.append(texts[i])
    refs += list(char_images)
    prompts += _char_prompts(story, char_owner)
    if spec == "all":
        return refs, prompts, None
    per_frame = []
    for t in range(n):
        sel = select_refs(story, t, spec, n)
        present = set(story.frames[t].characters)
        sel += [n + j for j, name in enumerate(char_owner) if name in present]
        per_frame.append(sel)
    return refs, prompts, per_frame


def _char_prompts(story, char_owner: List[str]) -> List[str]:
    return [f"{name}, {story.character(name).description}, {story.style}".strip(", ")
            for name in char_owner]


def _load_char_images(story):
    from PIL import Image

    imgs, owner = [], []
    for c in story.characters:
        for p in c.reference_images:
            with Image.open(p) as im:
                imgs.append(im.convert("RGB"))
            owner.append(c.name)
    return imgs, owner


def make_backbone(plan, step_progress: bool, cache_budget: Optional[int] = None):
    from .presets import configure_backbone

    return configure_backbone(_make_backbone(plan, step_progress, cache_budget),
                              plan["sampling"])


def _make_backbone(plan, step_progress: bool, cache_budget: Optional[int] = None):
    import torch

    cfg = plan["config"]
    dtype = getattr(torch, plan["dtype"])
    if cfg["backbone"] == "sdxl":
        from pipelines.story_iter.backbone_sdxl import SDXLBackbone

        return SDXLBackbone(plan["model"], plan["ip_adapter"], plan["image_encoder"],
                            cfg["loras"], plan["device"], dtype, cfg["height"], cfg["width"],
                            cfg["steps"], cfg["guidance"],
                            step_progress=step_progress)
    from pipelines.story_iter.backbone_flux import FluxBackbone

    return FluxBackbone(plan["model"], cfg["loras"], plan["device"], dtype, cfg["height"],
                        cfg["width"], cfg["steps"], cfg["guidance"],
                        step_progress=step_progress, cache_budget_bytes=cache_budget,
                        record_batch=cfg["batch_size"])


def _memory_plan(plan, char_images: int):
    from pipelines.story_iter.memory import MemoryPlan

    cfg = plan["config"]
    extra = [p for p in (plan["ip_adapter"], plan["image_encoder"]) if p] + list(cfg["loras"])
    return MemoryPlan(backbone=cfg["backbone"], model=plan["model"],
                      extra_weight_paths=tuple(extra), dtype=plan["dtype"],
                      device=plan["device"], frames=cfg["frames"], batch_size=cfg["batch_size"],
                      height=cfg["height"], width=cfg["width"], guidance=cfg["guidance"],
                      refs=cfg["refs"], extra_refs=char_images, ip_adapter=plan["ip_adapter"])


def preflight_estimate(plan, args, char_images: int):
    """The estimate and the available memory, without refusing (non-main processes)."""
    from pipelines.story_iter.memory import GiB, available_bytes, estimate

    avail = (int(args.max_memory * GiB) if args.max_memory is not None
             else available_bytes(plan["device"])[0])
    return estimate(_memory_plan(plan, char_images)), avail


def preflight(plan, args, char_images: int):
    """``(estimate, available)``; raises PreflightError with options when it will not fit."""
    from pipelines.story_iter.memory import GiB, check_fits

    mp = _memory_plan(plan, char_images)
    if args.max_memory is not None:
        return check_fits(mp, int(args.max_memory * GiB), "--max-memory")
    return check_fits(mp)


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet.install()  # before diffusers/transformers import: some notices fire at import
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_device(args.device)  # before a process group is set up on it
        from pipelines.vistorybench.cli_hooks import check_export_args

        from .presets import apply as apply_preset

        from pipelines.world.demo import world_default

        # no --model/--story/--lora/--preset: the story world's trained model, when built
        args.world = world_default(args, sys.argv[1:] if argv is None else argv)
        args.preset_notes = apply_preset(args, parser, argv)  # --preset fills what is unset
        check_export_args(args)
    except UsageError as e:
        return report_usage_error(PROG, e)
    from pipelines.story_iter.dist import init_dist

    dist = init_dist(args.device)
    try:
        return _run(args, dist)
    except UsageError as e:
        return report_usage_error(PROG, e)
    finally:
        dist.close()


def _quiet_prompt_truncation() -> None:
    """diffusers warns at every call whose prompt exceeds the tokenizer (77 tokens for SDXL,
    32 for the tiny preset); the run says it once (:func:`_truncation_note`) instead."""
    import logging

    class _Drop(logging.Filter):
        def filter(self, record):
            return "input was truncated because" not in record.getMessage()

    for name in ("diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
                 "diffusers.pipelines.flux.pipeline_flux"):
        logging.getLogger(name).addFilter(_Drop())


def _truncation_note(backbone, prompts: List[str]) -> Optional[str]:
    """How many prompts the text encoders cut (the stock pipelines truncate to their limit)."""
    pipe = backbone.pipe
    worst = None
    for name in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, name, None)
        if tok is None:
            continue
        limit = int(tok.model_max_length)
        if name == "tokenizer_2" and getattr(backbone, "max_seq", None):
            limit = int(backbone.max_seq)
        n = sum(len(tok(p).input_ids) > limit for p in prompts)
        if n and (worst is None or n > worst[0]):
            worst = (n, limit)
    if worst is None:
        return None
    return (f"note: {worst[0]} of {len(prompts)} prompts are longer than the text encoder's "
            f"{worst[1]} tokens; they are truncated to {worst[1]}, as the stock pipeline does")


def _run(args, dist) -> int:
    from pipelines.story import StoryError
    from pipelines.story_iter.lock import LockHeld, OutputLock
    from pipelines.story_iter.memory import PreflightError, fmt

    try:
        plan = resolve(args, dist)
    except StoryError as e:
        raise UsageError(str(e)) from None
    plan["processes"] = dist.world
    cfg, story, out = plan["config"], plan["story"], plan["out"]
    n, rounds = cfg["frames"], cfg["rounds"]
    say = print if dist.is_main else (lambda *a, **k: None)
    char_images, char_owner = _load_char_images(story)

    # -- output folder: lock, fresh or resume, preflight; all before any weight is loaded.
    # The main process decides and the others follow (one refusal stops every process).
    old, lock, created = None, None, False
    msg, code = "", 0
    if dist.is_main:
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = OutputLock(out, say=lambda m: print(m, flush=True)).acquire()
            old = prepare_out(out, cfg)
            est, avail = preflight(plan, args, len(char_images))
        except (LockHeld, ResumeRefused) as e:
            msg, code = str(e), 3
        except PreflightError as e:
            msg, code = str(e), 4
        except BaseException:
            if lock:
                lock.release()
            abandon(out, created)
            raise
        if msg:
            if lock:
                lock.release()
            abandon(out, created)
    dist.broadcast_ok(not msg, msg)
    if msg:
        print(f"error: {msg}", file=sys.stderr)
        return code
    if not dist.is_main:
        est, avail = preflight_estimate(plan, args, len(char_images))
    if old is not None:
        done, nxt = frames_on_disk(out, rounds, n)
        total = n * (rounds + 1)
        plan["resume"] = {"done": done, "total": total, "todo": total - done,
                          "next": nxt or (rounds, n - 1),
                          "previous_status": old.get("status")}
    rows = plan_rows(plan)
    for note in plan["notes"]:
        say(note, flush=True)
    say(format_plan(rows), flush=True)
    say(f"preflight: about {est.describe()} needed on {plan['device']}, {fmt(avail)} available",
        flush=True)
    try:
        return _draw(args, dist, plan, rows, old, est, avail, char_images, char_owner, say,
                     created)
    finally:
        if lock:
            lock.release()


def _draw(args, dist, plan, rows, old, est, avail, char_images, char_owner, say,
          created) -> int:
    import torch

    from pipelines.lora_files import check_lora_applied
    from pipelines.story_iter.progress import FrameProgress, bars_wanted
    from pipelines.story_iter.report import (PeakMemory, atomic_write_json, frame_path,
                                             round_dir, save_png_atomic, versions,
                                             write_index_html)

    from .presets import frame_text

    cfg, story, out = plan["config"], plan["story"], plan["out"]
    n, rounds = cfg["frames"], cfg["rounds"]
    scales = round_scales(cfg["scales"][0], cfg["scales"][1], rounds)
    seeds = [frame_seed(cfg, i) for i in range(n)]
    texts = [frame_text(story, i, plan["sampling"]) for i in range(n)]
    manifest = None
    written = 0
    progress = None
    try:
        if dist.is_main:
            manifest = old or {
                "format": "storyattn.story_iter/1",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "config": cfg,
                "rounds": {},
                "sessions": [],
            }
            manifest.update({
                "status": "running",
                "plan": [[k, v] for k, v in rows],
                "story": {"title": story.title, "style": story.style, "source": story.source,
                          "characters": [{"name": c.name, "description": c.description,
                                          "reference_images": list(c.reference_images)}
                                         for c in story.characters]},
                "prompts": texts,
                "sampling": plan["sampling"],
                "preset": plan["preset"],
                "vistorybench": plan["vistorybench"],
                "frame_characters": [list(f.characters) for f in story.frames],
                "seeds": seeds,
                "round_scales": scales,
                "versions": versions(),
                "demo": plan["demo"],
                "notes": plan["notes"],
            })
            manifest["sessions"].append({
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": plan["device"],
                "processes": dist.world, "resumed": old is not None,
                "preflight": {**est.as_dict(), "available": avail}})
            atomic_write_json(out / "manifest.json", manifest)
            write_index_html(out, manifest)
        dist.barrier()  # the folder and manifest exist before anyone writes frames

        # -- load ---------------------------------------------------------------------------
        t0 = time.perf_counter()
        # what the reference cache may hold once weights, activations and runtime are counted
        budget = int(avail * 0.92) - (est.weights + est.activations + est.overhead)
        backbone = make_backbone(plan, not args.no_step_progress and bars_wanted(),
                                 cache_budget=max(0, budget))
        with quiet.no_loading_bars():
            backbone.load()
        for i, lp in enumerate(cfg["loras"]):
            check_lora_applied(backbone.pipe, f"lora{i}", lp, cfg["backbone"])
        load_s = time.perf_counter() - t0
        say(f"loaded {cfg['backbone']} from {plan['model']} in {load_s:.1f} s", flush=True)
        note = _truncation_note(backbone, texts)
        if note:
            say(note, flush=True)
        _quiet_prompt_truncation()

        bs = cfg["batch_size"]
        batches = [list(range(s, min(n, s + bs))) for s in range(0, n, bs)]
        mine = [b for c, b in enumerate(batches) if c % dist.world == dist.rank]
        stop_after = int(os.environ.get(STOP_ENV, "0") or 0)
        todo_all = sum(1 for r in range(rounds + 1) for b in mine for i in b
                       if not frame_path(out, r, i).is_file())
        progress = FrameProgress(todo_all, rounds, enabled=dist.is_main)

        for r in range(rounds + 1):
            rdir = round_dir(out, r)
            todo = [b for b in mine if any(not frame_path(out, r, i).is_file() for i in b)]
            stats: Dict[str, Any] = {"rank": dist.rank, "frames_drawn": 0, "encoder_images": 0,
                                     "cache_bytes": 0, "wall_s": 0.0, "batches": 0}
            if todo:
                progress.start_round(r, sum(len(b) for b in todo))
                rdir.mkdir(parents=True, exist_ok=True)
                t_round = time.perf_counter()
                enc_before = backbone.encoder_images
                with PeakMemory(plan["device"]) as peak:
                    refs, ref_prompts, per_frame = _round_refs(
                        story, r, out, n, cfg["refs"], char_images, char_owner, texts,
                        plan["sampling"]["round0_refs"] == "characters")
                    info = backbone.begin_round(refs, scales[r], ref_prompts=ref_prompts)
                    stats.update(cache_bytes=info["cache_bytes"], num_refs=info["num_refs"],
                                 cache_scope=info.get("cache_scope", "round"))
                    try:
                        for b in todo:
                            missing = [i for i in b if not frame_path(out, r, i).is_file()]
                            gens = [torch.Generator("cpu").manual_seed(seeds[i]) for i in b]
                            # a partly written batch is drawn whole (same batch -> same
                            # numbers) but only its missing frames are written
                            imgs = backbone.draw([texts[i] for i in b], gens,
                                                 None if per_frame is None
                                                 else [per_frame[i] for i in b])
                            for i, img in zip(b, imgs):
                                if i in missing:
                                    save_png_atomic(img, frame_path(out, r, i))
                                    written += 1
                                    stats["frames_drawn"] += 1
                                    if stop_after and written >= stop_after:
                                        raise SystemExit(75)
                            stats["batches"] += 1
                            stats["cache_bytes"] = max(stats["cache_bytes"], backbone.cache_bytes)
                            progress.update(len(missing))
                    finally:
                        backbone.end_round()
                stats["encoder_images"] = backbone.encoder_images - enc_before
                stats["wall_s"] = time.perf_counter() - t_round
                stats["peak_memory_bytes"] = peak.peak_bytes
                stats["peak_memory_kind"] = peak.kind
                atomic_write_json(rdir / _STATS_NAME.format(rank=dist.rank), stats)
            dist.barrier()  # every process's frames of round r are on disk before round r+1
            if dist.is_main:
                _merge_round(out, r, scales[r] if cfg["backbone"] == "sdxl" else None, manifest,
                             world=dist.world)
                atomic_write_json(out / "manifest.json", manifest)
                write_index_html(out, manifest)
        progress.close()
    except KeyboardInterrupt:
        if progress is not None:
            progress.close()
        done, _ = frames_on_disk(out, rounds, n)
        if manifest is not None:
            manifest["status"] = "interrupted"
            manifest["sessions"][-1].update(interrupted=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                            frames_written=written)
            atomic_write_json(out / "manifest.json", manifest)
            write_index_html(out, manifest)
        print(f"interrupted after {written} frames ({done} of {n * (rounds + 1)} done); "
              "rerun the same command to resume", file=sys.stderr, flush=True)
        return 130
    except BaseException:
        if written == 0 and old is None:  # a failed start: no half-made folder
            abandon(out, created)
        raise

    if dist.is_main:
        missing = [(r, i) for r in range(rounds + 1) for i in range(n)
                   if not frame_path(out, r, i).is_file()]
        manifest["status"] = "complete" if not missing else f"incomplete: {len(missing)} missing"
        manifest["sessions"][-1]["load_s"] = load_s
        manifest["sessions"][-1]["frames_written"] = written
        manifest["sessions"][-1]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        atomic_write_json(out / "manifest.json", manifest)
        write_index_html(out, manifest)
        print(f"done: {n} frames x {rounds + 1} rounds in {out}/ "
              f"(open {out / 'index.html'})", flush=True)
        if args.export and not missing:
            from pipelines.vistorybench.cli_hooks import export_run

            dest = export_run(out, args.export, args.method, args.vistorybench_mode, args.lang,
                              args.timestamp)
            print(f"exported round {rounds} for ViStoryBench: {dest}/", flush=True)
    return 0


def _merge_round(out: Path, r: int, scale: Optional[float], manifest: Dict[str, Any],
                 world: int) -> None:
    """Fold the processes' stats files of round r into the manifest."""
    from pipelines.story_iter.report import read_json, round_dir

    rdir = round_dir(out, r)
    per = []
    for k in range(world):
        p = rdir / _STATS_NAME.format(rank=k)
        if p.is_file():
            per.append(read_json(p))
    if not per:
        return
    key = str(r)
    prev = manifest["rounds"].get(key, {})
    drawn = sum(s["frames_drawn"] for s in per)
    entry = {
        "scale": scale,
        "wall_s": max(s["wall_s"] for s in per),
        "frames_drawn": drawn,
        "encoder_images": sum(s["encoder_images"] for s in per),
        "encoder_images_per_process": [s["encoder_images"] for s in per],
        "cache_bytes": max(s["cache_bytes"] for s in per),
        "num_refs": max(s.get("num_refs", 0) for s in per),
        "cache_scope": per[0].get("cache_scope", "round"),
        "peak_memory_bytes": max(s.get("peak_memory_bytes", 0) for s in per),
        "peak_memory_kind": per[0].get("peak_memory_kind"),
        "processes": len(per),
    }
    if prev and prev.get("frames_drawn"):
        # a resumed round keeps the earlier sessions' figures next to this one's
        entry["earlier_sessions"] = prev.get("earlier_sessions", []) + [
            {k: v for k, v in prev.items() if k != "earlier_sessions"}]
    manifest["rounds"][key] = entry
    for p in rdir.glob("_stats_rank*.json"):
        p.unlink()

