"""The run plan of ``python -m pipelines.story_iter``: arguments -> checked settings, before
any weight loads.

Every user mistake found here raises :class:`~pipelines.cli_common.UsageError` (one line,
naming the argument and the fix).  Defaults: a model whose config was built for a small
size (the tiny presets: 64 px) runs at that size with the demo's rounds/steps/batch; a
full-size model (>= 512 px) gets the published Story-Iter settings.  Explicit
``--height/--width/--steps/--rounds/--batch-size`` always win.

:data:`PLAN_ROWS` turns a resolved plan into the ``(label, value)`` rows printed before
loading and stored in the manifest (``"plan"``): a new option adds one row there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..cli_common import UsageError
from ..lora_files import check_lora_file
from . import story as story_stage
from .model_folder import SMALL_BELOW, check_model, is_distilled, native_size, size_multiple
from .presets import PLAN_ROWS as SAMPLING_ROWS
from .presets import config_fields, sampling_config

__all__ = ["PUBLISHED", "DEMO", "parse_refs", "resolve", "PLAN_ROWS", "plan_rows", "format_plan",
           "check_device", "native_size", "size_multiple"]

# Published Story-Iter defaults and the reduced ones for models built for a small size.
PUBLISHED = dict(rounds=10, steps=50, scales=(0.3, 0.5), guidance_sdxl=5.0, guidance_flux=3.5,
                 height=1024, width=1024, batch_size=4, seed=0)
# FLUX.2 [klein] as Black Forest Labs run it: the step-distilled model 4 steps, no CFG
# (guidance 1.0); the base model 50 steps with CFG 4.0 (Flux2KleinPipeline's default)
KLEIN = {True: dict(steps=4, guidance=1.0), False: dict(steps=50, guidance=4.0)}
DEMO = dict(rounds=2, steps=3, batch_size=10)


def parse_refs(spec: str) -> Tuple[str, int]:
    """``all`` -> ("all", 0); ``topk:K`` / ``window:W`` / ``solo:K`` -> (kind, K)."""
    if spec == "all":
        return "all", 0
    kind, sep, k = spec.partition(":")
    if kind in ("topk", "window", "solo") and sep and k.isdigit() and int(k) >= 1:
        return kind, int(k)
    raise ValueError(f"--refs {spec!r}: expected all, topk:K, window:W or solo:K with K, W >= 1 "
                     "(e.g. --refs topk:3)")


def _parse_scales(s: Optional[str]) -> Tuple[float, float]:
    if s is None:
        return PUBLISHED["scales"]
    a, sep, b = s.partition(":")
    try:
        return (float(a), float(a)) if not sep else (float(a), float(b))
    except ValueError:
        raise UsageError(f"--scales {s!r}: expected A:B, e.g. --scales 0.3:0.5") from None


def check_device(spec: Optional[str]) -> str:
    """The device to run on; refuses one this torch cannot use."""
    import torch

    if spec is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {spec}: not a device name; give cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: this torch ({torch.__version__}) has no usable "
                             "CUDA; use --device cpu, or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s); "
                             f"give cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        raise UsageError(f"--device {spec}: Story-Iter runs on cpu or cuda")
    return spec


def resolve(args, dist) -> Dict[str, Any]:
    """Fill defaults and check every argument; returns the run plan (nothing loaded)."""
    notes: List[str] = []
    device = check_device(args.device)
    if device == "cuda" and dist.world > 1:
        device = f"cuda:{dist.local_rank}"
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    try:
        parse_refs(args.refs)
    except ValueError as e:
        raise UsageError(str(e)) from None

    story = story_stage.load(args)
    if args.frames is not None and not 1 <= args.frames <= len(story.frames):
        raise UsageError(f"--frames {args.frames}: the story has {len(story.frames)} frames "
                         f"(give 1 .. {len(story.frames)})")
    story = story.truncated(args.frames)
    if args.refs.startswith("solo:") and not any(f.regions for f in story.frames):
        raise UsageError(f"--refs {args.refs}: a solo reference is read where its character stands, "
                         "and no frame of this story has 'regions' (add a layout to the story "
                         "file, docs/story-format.md, or use --refs topk:K)")

    demo = args.model is None
    ip_adapter, image_encoder = args.ip_adapter, args.image_encoder
    if demo:
        from pipelines import tiny

        if args.backbone == "sdxl":
            model = tiny.get_tiny_sdxl()
            if ip_adapter is None:
                ip_adapter = str(Path(model) / tiny.SDXL_IP_ADAPTER_SUBFOLDER /
                                 tiny.SDXL_IP_ADAPTER_WEIGHT_NAME)
                image_encoder = image_encoder or str(Path(model) / tiny.SDXL_IP_ADAPTER_SUBFOLDER /
                                                     tiny.SDXL_IMAGE_ENCODER_FOLDER)
        elif args.backbone == "flux2":
            from pipelines.tiny import get_tiny_flux2

            model = get_tiny_flux2()
        else:
            model = tiny.get_tiny_flux()
    else:
        model = args.model
    model_path = check_model(args.backbone, model)
    if args.backbone == "sdxl" and ip_adapter is None:
        raise UsageError("--ip-adapter: --backbone sdxl with --model needs --ip-adapter PATH "
                         "(a local IP-Adapter weights file)")
    if ip_adapter is not None and not Path(ip_adapter).exists():
        raise UsageError(f"--ip-adapter {ip_adapter}: file not found")
    for lp in args.lora:
        check_lora_file(lp, args.backbone)

    native = native_size(args.backbone, model_path)
    small = native is not None and native < SMALL_BELOW
    base = dict(DEMO, height=native, width=native) if small else {}
    if native and not small:
        base.update(height=native, width=native)
    klein = KLEIN[is_distilled(model_path)] if args.backbone == "flux2" else {}
    if klein and not small:
        base["steps"] = klein["steps"]

    world = getattr(args, "world", None)
    if world:
        base.update(world["settings"])
        notes.append(world["note"])

    def pick(name):
        v = getattr(args, name)
        return v if v is not None else base.get(name, PUBLISHED[name])

    rounds, steps, batch = pick("rounds"), pick("steps"), pick("batch_size")
    height, width = pick("height"), pick("width")
    seed = args.seed if args.seed is not None else PUBLISHED["seed"]
    guidance = args.guidance if args.guidance is not None else klein.get("guidance") or (
        PUBLISHED["guidance_sdxl"] if args.backbone == "sdxl" else PUBLISHED["guidance_flux"])
    if klein and klein["guidance"] == 1.0 and guidance != 1.0:
        notes.append(f"--guidance {guidance}: the step-distilled klein has no CFG branch, so "
                     "the guidance is not used (the base klein's is)")
    a, b = _parse_scales(args.scales)
    for name, v, lo in (("rounds", rounds, 0), ("steps", steps, 1), ("batch-size", batch, 1),
                        ("height", height, 8), ("width", width, 8)):
        if v < lo:
            raise UsageError(f"--{name} {v}: must be >= {lo}")
    m = size_multiple(args.backbone, model_path)
    for name, v in (("height", height), ("width", width)):
        if v % m:
            raise UsageError(f"--{name} {v}: must be a multiple of {m} for this "
                             f"{args.backbone.upper()} model; e.g. --{name} {max(m, v // m * m)}")
    if small:
        what = (f"no --model: the built-in demo on the TINY offline {args.backbone} preset "
                "(random weights, the pictures are noise-like)" if demo else f"--model {model}")
        notes.append(f"{what}; built for {native}x{native}, so unset sizes, rounds, steps and "
                     f"batch take small-model defaults (published Story-Iter: "
                     f"{PUBLISHED['rounds']} rounds x {PUBLISHED['steps']} steps at "
                     f"{PUBLISHED['height']}x{PUBLISHED['width']})")

    out = Path(args.out) if args.out else (Path("story_iter_out") /
                                           f"{_slug(story.title)}-{args.backbone}")
    sampling = sampling_config(args, story)   # --preset and the sampling options
    notes.extend(getattr(args, "preset_notes", []))
    return dict(
        story=story, demo=demo, notes=notes, device=device, dtype=dtype, out=out,
        model=str(model), ip_adapter=ip_adapter, image_encoder=image_encoder, native=native,
        sampling=sampling, preset=getattr(args, "preset_info", None),
        vistorybench=story_stage.manifest_entry(args),
        config={
            "backbone": args.backbone,
            "model": str(Path(model).resolve()),
            "ip_adapter": str(Path(ip_adapter).resolve()) if ip_adapter else None,
            "image_encoder": str(Path(image_encoder).resolve()) if image_encoder else None,
            "loras": [str(Path(p).resolve()) for p in args.lora],
            "story_fingerprint": story.fingerprint(),
            "frames": len(story.frames),
            "rounds": rounds,
            "steps": steps,
            "guidance": guidance,
            "scales": [a, b],
            "seed": seed,
            "seed_per_frame": bool(args.seed_per_frame),
            "batch_size": batch,
            "height": height,
            "width": width,
            "dtype": dtype,
            "refs": args.refs,
            **config_fields(sampling),
        },
    )


def _slug(title: str) -> str:
    s = "".join(c.lower() if c.isalnum() else "_" for c in title).strip("_")
    return "_".join(p for p in s.split("_") if p) or "story"


# ------------------------------------------------------------------------------------------
# the printed plan


def _resume_row(plan) -> str:
    r = plan.get("resume")
    if r is None:
        return "no (new run)"
    if r["todo"] == 0:
        return f"yes: all {r['total']} frames are done, nothing to draw"
    return (f"yes: {r['done']} of {r['total']} frames done, next round {r['next'][0]} "
            f"frame {r['next'][1]}")


def _model_row(plan) -> str:
    tag = " (tiny offline preset, random weights)" if plan["demo"] else ""
    return plan["model"] + tag


PLAN_ROWS: List[Tuple[str, Callable[[Dict[str, Any]], Optional[str]]]] = [
    ("backbone", lambda p: p["config"]["backbone"]),
    ("model", _model_row),
    ("ip-adapter", lambda p: p["ip_adapter"]),
    ("loras", lambda p: ", ".join(p["config"]["loras"]) or None),
    ("story", lambda p: f"{p['story'].title!r}, {p['config']['frames']} frames"),
    ("resolution", lambda p: f"{p['config']['width']}x{p['config']['height']}"
                             + (f" (model built for {p['native']}x{p['native']})"
                                if p.get("native") else "")),
    ("steps", lambda p: str(p["config"]["steps"])),
    ("rounds", lambda p: f"{p['config']['rounds']} refinement rounds after round 0 "
                         f"({(p['config']['rounds'] + 1) * p['config']['frames']} frames in all)"),
    ("batch", lambda p: f"{p['config']['batch_size']} frames per batch"),
    ("references", lambda p: p["config"]["refs"]),
    ("guidance", lambda p: str(p["config"]["guidance"])),
    *SAMPLING_ROWS,
    ("seed", lambda p: f"{p['config']['seed']}" + (" + frame number"
                                                     if p["config"]["seed_per_frame"] else "")),
    ("dtype", lambda p: p["dtype"]),
    ("device", lambda p: p["device"] + (f" x {p['processes']} processes"
                                        if p.get("processes", 1) > 1 else "")),
    ("output", lambda p: str(p["out"])),
    ("export", story_stage.export_row),
    ("resume", _resume_row),
]


def plan_rows(plan: Dict[str, Any]) -> List[Tuple[str, str]]:
    """``(label, value)`` rows of the plan; rows whose value is None are left out."""
    rows = []
    for label, fn in PLAN_ROWS:
        v = fn(plan)
        if v is not None:
            rows.append((label, v))
    return rows


def format_plan(rows: List[Tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "plan:\n" + "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)
