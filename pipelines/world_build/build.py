"""``python -m pipelines.world_build build``: train the world's models from a seed, stage by stage.

Stages (``STAGES``, in order; each writes its result under ``--out`` and is skipped when that
result is there, so an interrupted build resumes at the first unfinished stage):

========  ==========================================================================
vae       AutoencoderKL trained for reconstruction on rendered frames
base      FluxTransformer2DModel trained text-to-image (full weights, no references);
          writes the pipeline folder ``base/`` (``FluxPipeline.from_pretrained``)
gsa_data  story groups for stage gsa (identities of the training split)
gsa       ``python -m pipelines.train --stage gsa`` (LoRA, GSA in-batch, clean references)
dpo_data  the preference loop: ``python -m pipelines.world scenarios`` (training
          identities), ``python -m pipelines.candidates`` with base + stage 1, a studio
          (``python -m pipelines.studio``) on a free 127.0.0.1 port, the reader labeller
          (:mod:`.label`) over its HTTP API, the studio's export: ``dpo_data/set/pairs.jsonl``
dpo       ``python -m pipelines.train --stage dpo`` on that export
export    the pipeline folder, both LoRA files and the exported pools (``dpo_data/``)
          copied to ``--weights``
sdxl_*    the SDXL family (:mod:`.train_sdxl`): ``sdxl_base`` (text-to-image UNet on the
          world VAE), ``sdxl_ip`` (IP-Adapter on the frozen base), ``sdxl_export``
          (``--weights``/sdxl/); an SDXL-only build takes the committed VAE
========  ==========================================================================

``--from-weights DIR`` starts a build from committed weights instead of training them:
``vae``, ``base`` and ``gsa`` are taken from DIR (copied, with DIR's figures for them in
``build.json``, marked ``from_weights``), so ``--only dpo_data dpo export`` reruns stage 2 alone;
when ``--only`` names ``gsa_data`` or ``gsa`` only ``vae`` and ``base`` are taken (``--only
gsa_data gsa dpo_data dpo export`` retrains both LoRAs on the committed base).
``--profile`` picks a column of ``SETTINGS`` (default ``auto``: ``full`` on a GPU, ``cpu``
on a CPU); ``--set KEY=N`` changes one of its settings (e.g. ``dpo_scenarios=96``); the
settings used are written to the exported ``build.json``.

A stage is a :class:`Stage` (name, what it writes, a function); other backbones add theirs
with ``register_stage`` (or by appending to ``STAGES``).  ``build.json`` in ``--out`` keeps
every stage's figures (losses, steps, seconds).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ..world.recipe import WORLD_GROUPS, WORLD_GSA_KIND, WORLD_PER_GROUP, WORLD_RECIPE, \
    recipe_argv, world_gsa_data

__all__ = ["Stage", "STAGES", "register_stage", "SETTINGS", "run_build", "Context"]

# the SDXL base learns looks from captions that say them (half its frames), which takes 6000
# steps (all four attributes of a told look 0.13 of the time at 2000, 0.98 at 6000); the
# IP-Adapter on that base carries a held-out reference's colour 0.42 of the time after 1000
# steps, 0.54 after 2000 (docs/world.md).  ~15.5 min of an idle 2-core CPU
SDXL_BASE_STEPS, SDXL_IP_STEPS, SDXL_DESCRIBED_PERCENT, SDXL_IP_POSED_PERCENT = 6000, 2000, 50, 50
# the gsa / dpo batch and the dpo steps are the world recipe's (pipelines.train's defaults for
# the world model); stage gsa trains longer here than a user's CPU run does.  96 scenarios for
# stage 2: a stage 1 that draws the reference's accessory 0.97 of the time on training
# identities left 24 scenarios with 3 losers (2 pools, 5 pairs).  Stage gsa runs 3000 steps:
# at 1500 the two-character binding depended on the base (duo identity-cross 0.867 on one
# base, 0.753 on a second build's); 3000 gave 0.864 on the second (docs/world.md)
_FULL: Dict[str, int] = dict(
    vae_steps=1500, vae_batch=32, base_steps=6000, base_batch=64, gsa_groups=WORLD_GROUPS,
    gsa_steps=3000, gsa_batch=WORLD_RECIPE["gsa"]["batch_size"], dpo_scenarios=96,
    dpo_duo_percent=0, dpo_layout=0,
    dpo_candidates=4, dpo_steps=WORLD_RECIPE["dpo"]["max_steps"],
    dpo_batch=WORLD_RECIPE["dpo"]["batch_size"], sample_steps=10,
    sdxl_base_steps=SDXL_BASE_STEPS, sdxl_base_batch=32,
    sdxl_described_percent=SDXL_DESCRIBED_PERCENT, sdxl_ip_steps=SDXL_IP_STEPS, sdxl_ip_batch=32,
    sdxl_ip_posed_percent=SDXL_IP_POSED_PERCENT)
# steps per stage ("profiles"): "full" for a GPU, "cpu" the same chain cut to fit a 2-core CPU
# (the committed weights: pipelines/world/weights/build.json records it), "quick" a smoke test
# of the whole chain
SETTINGS: Dict[str, Dict[str, int]] = {
    "full": _FULL,
    # sized to an idle 2-core CPU in under 60 min (docs/world.md has the stage times): half
    # the VAE batch, the base at 9000 x 32 (at 6000 x 32 it drew the prompted size 0.61 of
    # the time, adherence 0.84); the SDXL stages as in full (fewer steps cost the SDXL base
    # its told looks and the IP-Adapter its identity)
    "cpu": dict(_FULL, vae_batch=16, base_steps=9000, base_batch=32),
    "quick": dict(vae_steps=4, vae_batch=4, base_steps=4, base_batch=4, gsa_groups=4,
                  gsa_steps=2, gsa_batch=2, dpo_scenarios=3, dpo_candidates=3, dpo_steps=2,
                  dpo_duo_percent=0, dpo_layout=0, dpo_batch=1, sample_steps=4,
                  sdxl_base_steps=4, sdxl_base_batch=4, sdxl_described_percent=0,
                  sdxl_ip_steps=4, sdxl_ip_batch=4, sdxl_ip_posed_percent=0),
}


@dataclass
class Context:
    out: Path
    weights: Path
    seed: int
    device: str
    settings: Dict[str, int]
    results: Dict[str, Any]
    profile: str = "full"

    def log(self, rec: Dict[str, Any]) -> None:
        with open(self.out / "build_log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def cpu_flag(self) -> List[str]:
        return ["--cpu"] if self.device == "cpu" else []


@dataclass
class Stage:
    name: str
    done_marker: str                       # path under --out that exists once the stage is done
    run: Callable[[Context], Dict[str, Any]]


STAGES: List[Stage] = []


def register_stage(stage: Stage, after: Optional[str] = None) -> None:
    """Add a stage (at the end, or right after the stage named ``after``)."""
    if any(s.name == stage.name for s in STAGES):
        raise ValueError(f"stage {stage.name!r} is already registered")
    if after is None:
        STAGES.append(stage)
    else:
        STAGES.insert([s.name for s in STAGES].index(after) + 1, stage)


# ---- stages ---------------------------------------------------------------------------------


def _stage_vae(ctx: Context) -> Dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL

    from ..model_presets import world_vae_config
    from .train_base import train_vae

    torch.manual_seed(ctx.seed)
    vae = AutoencoderKL(**world_vae_config())
    s = ctx.settings
    res = train_vae(vae, s["vae_steps"], s["vae_batch"], ctx.seed, ctx.device, log=ctx.log)
    vae.to("cpu").save_pretrained(str(ctx.out / "vae"), safe_serialization=True)
    # legibility before anything is trained on it: what the reader still sees after a round trip
    from ..world.legibility import vae_roundtrip

    res["roundtrip"] = vae_roundtrip(vae, device=ctx.device)
    print(f"[world] vae round trip (share kept): {json.dumps(res['roundtrip'])}", flush=True)
    return res


def _stage_base(ctx: Context) -> Dict[str, Any]:
    import torch
    from diffusers import AutoencoderKL, FluxPipeline

    from ..model_presets import build_world_pipeline
    from .train_base import train_base

    tmp = ctx.out / "base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae = AutoencoderKL.from_pretrained(str(ctx.out / "vae"))
    build_world_pipeline(tmp, seed=ctx.seed, vae=vae)
    pipe = FluxPipeline.from_pretrained(str(tmp), local_files_only=True)
    torch.manual_seed(ctx.seed)
    s = ctx.settings
    res = train_base(pipe, s["base_steps"], s["base_batch"], ctx.seed, ctx.device, log=ctx.log)
    pipe.to("cpu")
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(ctx.out / "base", ignore_errors=True)
    tmp.rename(ctx.out / "base")
    return res


def _stage_gsa_data(ctx: Context) -> Dict[str, Any]:
    world_gsa_data(ctx.out / "gsa_data", seed=ctx.seed, n_groups=ctx.settings["gsa_groups"])
    return {"groups": ctx.settings["gsa_groups"], "per_group": WORLD_PER_GROUP,
            "kind": WORLD_GSA_KIND}


def _train(ctx: Context, argv: List[str]) -> Dict[str, Any]:
    """Run the project's trainer as a subprocess (its own process: accelerate state, peft
    injection and memory stay out of the build)."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pipelines.train", *argv, *ctx.cpu_flag()]
    print("[world] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    out = Path(argv[argv.index("--output-dir") + 1])
    summary = json.loads((out / "train_summary.json").read_text())
    losses = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    k = max(1, len(losses) // 10)
    return {"steps": summary["steps"], "first_loss": float(np.mean([r["loss"] for r in losses[:k]])),
            "final_loss": float(np.mean([r["loss"] for r in losses[-k:]])),
            "last": summary["last"], "train_time_s": summary["train_time_s"],
            "time_s": round(time.perf_counter() - t0, 1), "command": " ".join(cmd)}


def _stage_gsa(ctx: Context) -> Dict[str, Any]:
    s = ctx.settings
    return _train(ctx, ["--stage", "gsa", "--model", str(ctx.out / "base"),
                        "--data", str(ctx.out / "gsa_data"), "--output-dir", str(ctx.out / "gsa"),
                        *recipe_argv("gsa", max_steps=s["gsa_steps"], batch_size=s["gsa_batch"],
                                     checkpoint_every=0, seed=ctx.seed)])


DPO_SET = "dpo_data/set"        # the candidate set (studio ROOT: dpo_data/)


def _stage_dpo_data(ctx: Context) -> Dict[str, Any]:
    """The preference loop a user runs, with the reader for the expert: world scenarios ->
    ``python -m pipelines.candidates`` (base + this build's stage 1) -> a studio on a free
    loopback port -> the reader labeller over its HTTP API -> the studio's export."""
    from .studio_child import studio_process
    from .label import export_set, label_set
    from ..world.scenarios import load_truth, make_scenarios

    s = ctx.settings
    t0 = time.perf_counter()
    root = ctx.out / "dpo_data"
    # same seed, same files: a rerun finds the candidate set's scenarios unchanged and resumes
    scen = make_scenarios(root / "scenarios", n=s["dpo_scenarios"], seed=ctx.seed,
                          split_seed=ctx.seed, duo_share=s["dpo_duo_percent"] / 100,
                          layout=bool(s["dpo_layout"]))
    cmd = [sys.executable, "-m", "pipelines.candidates", "--scenarios", str(scen),
           "--out", str(ctx.out / DPO_SET), "-k", str(s["dpo_candidates"]),
           "--model", str(ctx.out / "base"), "--lora", str(ctx.out / "gsa" / "pytorch_lora_weights.safetensors"),
           "--steps", str(s["sample_steps"]), "--seed", str(ctx.seed),
           "--batch-size", str(s["dpo_candidates"]), "--device", ctx.device, "--no-step-progress"]
    print("[world] " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    t_cand = time.perf_counter() - t0
    with studio_process(root) as url:
        print(f"[world] studio at {url}; the reader labels {DPO_SET} through it", flush=True)
        res = label_set(url, "set", truth=load_truth(scen.parent), export=False)
        if not res["pools"]:
            raise RuntimeError(
                f"no scenario got both a winner and a loser from the reader ({res['winners']} "
                f"winners, {res['losers']} losers of {res['candidates']} candidates): stage 1 "
                "is too weak (a --quick build's is) or too strong for reader-labelled pairs; "
                "check the loop on the committed stage 1 with --from-weights "
                "pipelines/world/weights, or raise --set dpo_scenarios=N")
        res["export"] = export_set(url, res["set"])
    n = res["candidates"]
    return {"scenarios": s["dpo_scenarios"], "candidates": n, "sample_steps": s["sample_steps"],
            "candidates_time_s": round(t_cand, 1), "winners": res["winners"],
            "losers": res["losers"], "unmarked": res["unmarked"],
            "winner_rate": res["winners"] / n,
            # per character shown (a duo scenario's candidate shows two)
            "accessory_rate": res["right_accessory"] / res["appearances"],
            "colour_rate": res["right_colour"] / res["appearances"], "pools_kept": res["export"]["scenarios"],
            "losers_only_left_out": res["losers_only"], "winners_only": res["winners_only"],
            "pairs": res["export"]["pairs"], "label_time_s": round(time.perf_counter() - t0 - t_cand, 1),
            "pairs_file": str(ctx.out / DPO_SET / "pairs.jsonl"), "candidates_command": " ".join(cmd),
            "time_s": round(time.perf_counter() - t0, 1)}


def _stage_dpo(ctx: Context) -> Dict[str, Any]:
    s = ctx.settings
    return _train(ctx, ["--stage", "dpo", "--model", str(ctx.out / "base"),
                        "--stage1-lora", str(ctx.out / "gsa"),
                        "--data", str(ctx.out / DPO_SET / "pairs.jsonl"),
                        "--output-dir", str(ctx.out / "dpo"),
                        *recipe_argv("dpo", max_steps=s["dpo_steps"], batch_size=s["dpo_batch"],
                                     checkpoint_every=0, seed=ctx.seed,
                                     # a duo scenario's pairs read both references
                                     **({"num_refs": 2} if s["dpo_duo_percent"] else {}))])


def _stage_export(ctx: Context) -> Dict[str, Any]:
    from ..preference_pools import copy_pairs
    from ..lora_files import LORA_WEIGHT_NAME
    from ..world import weights as W

    dst = ctx.weights
    tmp = dst.parent / (dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ctx.out / "base", tmp / W.FLUX_DIR)
    shutil.copy(ctx.out / "gsa" / LORA_WEIGHT_NAME, tmp / W.GSA_LORA)
    shutil.copy(ctx.out / "dpo" / LORA_WEIGHT_NAME, tmp / W.DPO_LORA)
    # the pools stage 2 learned from, committed with it (small: 64x64 PNGs)
    copy_pairs(ctx.out / DPO_SET / "pairs.jsonl", tmp / W.DPO_DATA)
    results = {k: v for k, v in ctx.results.items() if k != "export"}
    info = {"seed": ctx.seed, "device": ctx.device, "profile": ctx.profile,
            "settings": ctx.settings, "stages": results}
    (tmp / W.BUILD_FILE).write_text(json.dumps(info, indent=1) + "\n")
    if (dst / W.SDXL_DIR).is_dir():          # written by stage sdxl_export: keep it
        shutil.copytree(dst / W.SDXL_DIR, tmp / W.SDXL_DIR)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    size = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    return {"weights": str(dst), "bytes": size}


for _s in (Stage("vae", "vae/config.json", _stage_vae),
           Stage("base", "base/model_index.json", _stage_base),
           Stage("gsa_data", "gsa_data/metadata.jsonl", _stage_gsa_data),
           Stage("gsa", "gsa/pytorch_lora_weights.safetensors", _stage_gsa),
           Stage("dpo_data", DPO_SET + "/pairs.jsonl", _stage_dpo_data),
           Stage("dpo", "dpo/pytorch_lora_weights.safetensors", _stage_dpo),
           Stage("export", "export.done", _stage_export)):
    register_stage(_s)


def _sdxl_stages() -> None:
    """The SDXL stages (:mod:`.train_sdxl`, imported when a stage runs)."""
    def lazy(fn: str) -> Callable[[Context], Dict[str, Any]]:
        def run(ctx: Context) -> Dict[str, Any]:
            from . import train_sdxl

            return getattr(train_sdxl, fn)(ctx)
        return run

    for st in (Stage("sdxl_base", "sdxl_base/model_index.json", lazy("stage_sdxl_base")),
               Stage("sdxl_ip", "sdxl_ip/ip_adapter/ip-adapter_world.safetensors",
                     lazy("stage_sdxl_ip")),
               Stage("sdxl_export", "sdxl_export.done", lazy("stage_sdxl_export"))):
        register_stage(st)


_sdxl_stages()


# ---- driver ---------------------------------------------------------------------------------


FROM_WEIGHTS_STAGES = ("vae", "base", "gsa_data", "gsa")


def seed_from_weights(out: Path, src: Path, state: Dict[str, Any],
                      stages: Sequence[str] = FROM_WEIGHTS_STAGES) -> List[str]:
    """Make ``out`` a build whose vae, base and stage 1 are the weights in ``src`` (copies),
    their figures taken from ``src``'s build.json; return the stages so provided.  ``stages``
    without ``gsa``: only the vae and the base (the build retrains stage 1)."""
    from ..lora_files import LORA_WEIGHT_NAME
    from ..world import weights as W

    if not W.available(src):
        raise SystemExit(f"--from-weights {src}: no {W.FLUX_DIR}/ and {W.GSA_LORA} there; pass "
                         "a weights folder written by the export stage")
    info = W.build_info(src)
    if info.get("seed") != state["seed"]:
        raise SystemExit(f"--from-weights {src} was built with seed {info.get('seed')}; pass "
                         f"--seed {info.get('seed')} (the scenarios' identity split follows it)")
    if not (out / "base" / "model_index.json").is_file():
        shutil.copytree(src / W.FLUX_DIR, out / "base.tmp", dirs_exist_ok=True)
        (out / "base.tmp").rename(out / "base")
    if not (out / "vae" / "config.json").is_file():
        shutil.copytree(out / "base" / "vae", out / "vae", dirs_exist_ok=True)
    if "gsa" in stages:
        (out / "gsa").mkdir(exist_ok=True)
        shutil.copyfile(src / W.GSA_LORA, out / "gsa" / LORA_WEIGHT_NAME)
    for name, fig in info.get("stages", {}).items():
        # the SDXL stages' figures ride along for the export's build.json, but never over a
        # stage this build folder ran itself (a resume with --from-weights kept overwriting
        # a retrained sdxl_base's record with the committed one's)
        own = name in state["stages"] and "from_weights" not in state["stages"][name]
        if name in stages or (name.startswith("sdxl") and not own):
            state["stages"][name] = {**fig, "from_weights": str(src)}
    return [n for n in stages if n in state["stages"]]


def resolve_profile(profile: str, device: str) -> str:
    """``auto`` is ``full`` on a GPU and ``cpu`` on a CPU."""
    if profile == "auto":
        return "cpu" if device == "cpu" else "full"
    if profile not in SETTINGS:
        raise SystemExit(f"--profile {profile}: unknown; profiles: auto, {', '.join(SETTINGS)}")
    return profile


def run_build(out, weights, seed: int = 0, device: Optional[str] = None, mode: str = "auto",
              only: Optional[List[str]] = None, from_weights=None,
              overrides: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    mode = resolve_profile(mode, device)
    state_path = out / "build.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state and (state.get("seed") != seed or state.get("mode") != mode):
        raise SystemExit(f"{out} holds a build with seed {state.get('seed')} profile "
                         f"{state.get('mode')}; this one is seed {seed} profile {mode}: pass "
                         f"another --out")
    state.update(seed=seed, mode=mode)
    state.setdefault("stages", {})
    if from_weights is not None:
        # asked to (re)run stage 1: take only the vae and the base
        retrain = bool(only) and bool({"gsa_data", "gsa"} & set(only))
        got = seed_from_weights(out, Path(from_weights), state,
                                ("vae", "base") if retrain else FROM_WEIGHTS_STAGES)
        state_path.write_text(json.dumps(state, indent=1) + "\n")
        print(f"[world] stages {', '.join(got)} taken from {from_weights}", flush=True)
    settings = dict(SETTINGS[mode])
    print(f"[world] profile {mode} on {device}", flush=True)
    bad = sorted(set(overrides or {}) - set(settings))
    if bad:
        raise SystemExit(f"--set {bad[0]}: not a setting; settings: {', '.join(settings)}")
    settings.update(overrides or {})
    ctx = Context(out, Path(weights), seed, device, settings, state["stages"], profile=mode)
    for stage in STAGES:
        if only and stage.name not in only:
            continue
        if (out / stage.done_marker).exists() and stage.name in state["stages"]:
            print(f"[world] stage {stage.name}: done ({stage.done_marker}), skipped", flush=True)
            continue
        print(f"[world] stage {stage.name} ...", flush=True)
        t0 = time.perf_counter()
        res = stage.run(ctx)
        res["stage_time_s"] = round(time.perf_counter() - t0, 1)
        res["device"] = device
        state["stages"][stage.name] = res
        if stage.name == "export":
            (out / stage.done_marker).write_text("done\n")
        state_path.write_text(json.dumps(state, indent=1) + "\n")
        print(f"[world] stage {stage.name}: {json.dumps(res)}", flush=True)
    return state
