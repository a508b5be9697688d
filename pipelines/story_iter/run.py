"""The run stage of ``python -m pipelines.story_iter``: take the output folder (lock, fresh
or resumed, memory check), print the plan, load the backbone, draw every round's missing
frames and keep the manifest and contact sheet current.

Called by :func:`pipelines.story_iter.cli.main` with parsed arguments and the process group;
every refusal here is a one-line error with its own exit code (3: folder, 4: memory).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

from .. import quiet
from ..cli_common import UsageError
from ..contact_sheet import write_index_html
from ..lora_files import check_lora_applied
from ..run_folder import (MANIFEST, PeakMemory, atomic_write_json, frame_path, read_json,
                          round_dir, save_png_atomic, versions)
from ..story import StoryError
from ..vistorybench.export import export_run
from .load import make_backbone, preflight, preflight_estimate, truncation_note
from .lock import LockHeld, OutputLock
from .memory import PreflightError, fmt
from .outdir import ResumeRefused, abandon, frames_on_disk, prepare_out
from .plan import format_plan, plan_rows, resolve
from .presets import frame_text
from .progress import FrameProgress, bars_wanted
from .refs import frame_seed, load_char_images, round_refs, round_scales


__all__ = ["run", "STOP_ENV"]

# The round's per-process stats land here and are merged by the main process.
_STATS_NAME = "_stats_rank{rank}.json"

# Test hook: stop this process after it has written this many frames (simulates a kill
# at a frame boundary; a real kill can land anywhere, which the atomic writes cover).
STOP_ENV = "STORYATTN_STOP_AFTER_FRAMES"
# Test hook: after this many frames wait (up to a minute) once, so that a test's Ctrl-C lands
# mid-run however fast the model draws; the interrupt itself takes the real path.
PAUSE_ENV = "STORYATTN_PAUSE_AFTER_FRAMES"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def run(args, dist) -> int:
    """Resolve the plan, take the folder and draw; returns the exit code."""
    try:
        plan = resolve(args, dist)
    except StoryError as e:
        raise UsageError(str(e)) from None
    plan["processes"] = dist.world
    cfg, story, out = plan["config"], plan["story"], plan["out"]
    n, rounds = cfg["frames"], cfg["rounds"]
    say = print if dist.is_main else (lambda *a, **k: None)
    char_images, char_owner = load_char_images(story)

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


def _start_manifest(dist, plan, rows, old, est, avail, texts, seeds, scales):
    """The manifest this session writes (the main process's; None elsewhere), on disk with
    the contact sheet before any frame is drawn."""
    if not dist.is_main:
        return None
    cfg, story, out = plan["config"], plan["story"], plan["out"]
    manifest = old or {
        "format": "storyattn.story_iter/1",
        "created": _now(),
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
        "started": _now(), "device": plan["device"],
        "processes": dist.world, "resumed": old is not None,
        "preflight": {**est.as_dict(), "available": avail}})
    _save(out, manifest)
    return manifest


def _save(out: Path, manifest: Dict[str, Any]) -> None:
    atomic_write_json(out / MANIFEST, manifest)
    write_index_html(out, manifest)


def _load_backbone(args, plan, est, avail, texts, say):
    """The configured backbone with its weights and LoRAs loaded; returns it and the load time."""
    cfg = plan["config"]
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
    note = truncation_note(backbone, texts)
    if note:
        say(note, flush=True)
    quiet.prompt_truncation()
    return backbone, load_s


class _Drawn:
    """Frames this session wrote; a test hook (``STOP_ENV``) stops the process after a count."""

    def __init__(self):
        self.count = 0
        self.stop_after = int(os.environ.get(STOP_ENV, "0") or 0)
        self.pause_after = int(os.environ.get(PAUSE_ENV, "0") or 0)

    def add(self) -> None:
        self.count += 1
        if self.stop_after and self.count >= self.stop_after:
            raise SystemExit(75)
        if self.pause_after and self.count == self.pause_after:
            time.sleep(60)


def _draw_round(r, todo, backbone, plan, ctx, drawn, progress, rank) -> Dict[str, Any]:
    """Draw round r's missing frames in this process's batches ``todo``; returns its stats."""
    import torch

    cfg, story, out = plan["config"], plan["story"], plan["out"]
    texts, seeds, scales, char_images, char_owner = ctx
    n = cfg["frames"]
    stats: Dict[str, Any] = {"rank": rank, "frames_drawn": 0, "encoder_images": 0,
                             "cache_bytes": 0, "wall_s": 0.0, "batches": 0}
    progress.start_round(r, sum(len(b) for b in todo))
    rdir = round_dir(out, r)
    rdir.mkdir(parents=True, exist_ok=True)
    t_round = time.perf_counter()
    enc_before = backbone.encoder_images
    with PeakMemory(plan["device"]) as peak:
        refs, ref_prompts, per_frame, regions = round_refs(
            story, r, out, n, cfg["refs"], char_images, char_owner, texts,
            plan["sampling"]["round0_refs"] == "characters")
        info = backbone.begin_round(refs, scales[r], ref_prompts=ref_prompts)
        stats.update(cache_bytes=info["cache_bytes"], num_refs=info["num_refs"],
                     cache_scope=info.get("cache_scope", "round"))
        try:
            for b in todo:
                missing = [i for i in b if not frame_path(out, r, i).is_file()]
                gens = [torch.Generator("cpu").manual_seed(seeds[i]) for i in b]
                # a partly written batch is drawn whole (same batch -> same numbers) but
                # only its missing frames are written
                imgs = backbone.draw([texts[i] for i in b], gens,
                                     None if per_frame is None else [per_frame[i] for i in b],
                                     regions=None if regions is None else [regions[i] for i in b])
                for i, img in zip(b, imgs):
                    if i in missing:
                        save_png_atomic(img, frame_path(out, r, i))
                        stats["frames_drawn"] += 1
                        drawn.add()
                stats["batches"] += 1
                stats["cache_bytes"] = max(stats["cache_bytes"], backbone.cache_bytes)
                progress.update(len(missing))
        finally:
            backbone.end_round()
    stats["encoder_images"] = backbone.encoder_images - enc_before
    stats["wall_s"] = time.perf_counter() - t_round
    stats["peak_memory_bytes"] = peak.peak_bytes
    stats["peak_memory_kind"] = peak.kind
    atomic_write_json(rdir / _STATS_NAME.format(rank=rank), stats)
    return stats


def _draw(args, dist, plan, rows, old, est, avail, char_images, char_owner, say,
          created) -> int:
    cfg, story, out = plan["config"], plan["story"], plan["out"]
    n, rounds = cfg["frames"], cfg["rounds"]
    scales = round_scales(cfg["scales"][0], cfg["scales"][1], rounds)
    seeds = [frame_seed(cfg, i) for i in range(n)]
    texts = [frame_text(story, i, plan["sampling"]) for i in range(n)]
    ctx = (texts, seeds, scales, char_images, char_owner)
    manifest = None
    drawn = _Drawn()
    progress = None
    try:
        manifest = _start_manifest(dist, plan, rows, old, est, avail, texts, seeds, scales)
        dist.barrier()  # the folder and manifest exist before anyone writes frames
        backbone, load_s = _load_backbone(args, plan, est, avail, texts, say)

        bs = cfg["batch_size"]
        batches = [list(range(s, min(n, s + bs))) for s in range(0, n, bs)]
        mine = [b for c, b in enumerate(batches) if c % dist.world == dist.rank]
        todo_all = sum(1 for r in range(rounds + 1) for b in mine for i in b
                       if not frame_path(out, r, i).is_file())
        progress = FrameProgress(todo_all, rounds, enabled=dist.is_main)
        for r in range(rounds + 1):
            todo = [b for b in mine if any(not frame_path(out, r, i).is_file() for i in b)]
            if todo:
                _draw_round(r, todo, backbone, plan, ctx, drawn, progress, dist.rank)
            dist.barrier()  # every process's frames of round r are on disk before round r+1
            if dist.is_main:
                _merge_round(out, r, scales[r] if cfg["backbone"] == "sdxl" else None, manifest,
                             world=dist.world)
                _save(out, manifest)
        progress.close()
    except KeyboardInterrupt:
        if progress is not None:
            progress.close()
        done, _ = frames_on_disk(out, rounds, n)
        if manifest is not None:
            manifest["status"] = "interrupted"
            manifest["sessions"][-1].update(interrupted=_now(), frames_written=drawn.count)
            _save(out, manifest)
        print(f"interrupted after {drawn.count} frames ({done} of {n * (rounds + 1)} done); "
              "rerun the same command to resume", file=sys.stderr, flush=True)
        return 130
    except BaseException:
        if drawn.count == 0 and old is None:  # a failed start: no half-made folder
            abandon(out, created)
        raise
    if dist.is_main:
        _finish(args, plan, manifest, load_s, drawn.count)
    return 0


def _finish(args, plan, manifest, load_s: float, written: int) -> None:
    """Mark the run complete (or what is missing), and export it when asked."""
    cfg, out = plan["config"], plan["out"]
    n, rounds = cfg["frames"], cfg["rounds"]
    missing = [(r, i) for r in range(rounds + 1) for i in range(n)
               if not frame_path(out, r, i).is_file()]
    manifest["status"] = "complete" if not missing else f"incomplete: {len(missing)} missing"
    manifest["sessions"][-1]["load_s"] = load_s
    manifest["sessions"][-1]["frames_written"] = written
    manifest["sessions"][-1]["finished"] = _now()
    _save(out, manifest)
    print(f"done: {n} frames x {rounds + 1} rounds in {out}/ "
          f"(open {out / 'index.html'})", flush=True)
    if args.export and not missing:
        dest = export_run(out, args.export, args.method, args.vistorybench_mode, args.lang,
                          args.timestamp)
        print(f"exported round {rounds} for ViStoryBench: {dest}/", flush=True)


def _merge_round(out: Path, r: int, scale: Optional[float], manifest: Dict[str, Any],
                 world: int) -> None:
    """Fold the processes' stats files of round r into the manifest."""
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
