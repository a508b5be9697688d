"""Published settings as one flag (``--preset story-iter|gsa``) and the sampling options
they bundle: negative prompt, style template, scheduler, reference size, fp32 VAE decode.

``story-iter`` is what the official Story-Iter code does (UCSC-VLAA/story-iter ``run.py``
with ``StoryAdapterXL.generate``):

* every frame's text is a style template applied to the frame's prompt (comic by
  default), nothing else appended;
* the classifier-free-guidance branch encodes a fixed negative prompt (with its pooled
  embedding) instead of zeros; its image tokens are the adapter's projection of a zero
  image embedding (what GRCA already uses);
* DDIM (1000 training steps, scaled-linear betas 0.00085..0.012, no sample clipping,
  ``set_alpha_to_one=False``, ``steps_offset=1``, eta 0), 50 steps, 1024x1024;
* guidance 5.0: ``generate`` takes a ``guidance_scale`` argument but never passes it on,
  so the stock SDXL pipeline's default (5.0) is what runs;
* each previous-round frame is resized to 256x256 before the image encoder's own
  preprocessing; round weights ``linspace(0.3, 0.5, 10)``; one seed for every frame and
  round;
* fp16 weights, VAE decoded in fp32.

``flux2-klein`` / ``flux2-klein-base``: FLUX.2 [klein] with GSA over the previous round's
frames, as Black Forest Labs run the two klein checkpoints: the step-distilled model at 4
steps with no guidance (guidance 1.0: the pipeline skips CFG), the base model at 50 steps
with CFG 4.0 (the ``Flux2KleinPipeline`` default); the scheduler the folder ships.

``gsa`` is the GSA paper's inference setting: FLUX.1-dev, flow-matching Euler, 50 steps,
distilled guidance 3.5, Group-Shared Attention over the characters' reference images from
round 0 on (``--round0-refs characters``; later rounds add the previous round's frames),
the stage-1 and stage-2 LoRAs (``--lora S1 S2``).

A flag given on the command line always wins over the preset; the plan says which.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..cli_common import UsageError
from .model_folder import SMALL_BELOW, detect_backbone, is_distilled, native_size

__all__ = ["PRESETS", "STYLE_TEMPLATES", "STORY_ITER_NEGATIVE", "add_arguments", "apply",
           "frame_text", "sampling_config", "config_fields", "configure_backbone",
           "style_template", "PLAN_ROWS"]

STORY_ITER_NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality"

# The official templates; "{prompt}" is replaced by the frame's prompt as written.
STYLE_TEMPLATES = {
    "comic": "best quality, high quality, comic {prompt} . graphic illustration, comic art, "
             "graphic novel art, vibrant, highly detailed",
    "film": "best quality, high quality, cinematic film still, {prompt} . shallow depth of "
            "field, vignette, highly detailed, high budget, bokeh, cinemascope, moody, epic, "
            "gorgeous, film grain, grainy",
    "realistic": "best quality, high quality, {prompt}",
    "none": "{prompt}",
}

# Settings that only make sense at full size: a model built for a small size (the tiny
# offline presets) keeps the small-model defaults for these unless they are given by hand.
_SIZE_KEYS = ("rounds", "steps", "height", "width", "batch_size")

PRESETS: Dict[str, Dict[str, Any]] = {
    "story-iter": dict(
        backbone="sdxl", negative_prompt=STORY_ITER_NEGATIVE, style_template="comic",
        prompt_text="prompt", scheduler="ddim", ref_size=256, vae_fp32=True,
        dtype="float16", rounds=10, steps=50, guidance=5.0, scales="0.3:0.5",
        height=1024, width=1024, refs="all", seed_per_frame=False),
    "gsa": dict(
        backbone="flux", scheduler="euler", steps=50, guidance=3.5, refs="all",
        round0_refs="characters", height=1024, width=1024, seed_per_frame=False),
    "flux2-klein": dict(
        backbone="flux2", scheduler="model", steps=4, guidance=1.0, refs="all",
        height=1024, width=1024, seed_per_frame=False),
    "flux2-klein-base": dict(
        backbone="flux2", scheduler="model", steps=50, guidance=4.0, refs="all",
        height=1024, width=1024, seed_per_frame=False),
}

# the klein preset that fits a folder's is_distilled flag (a mismatch is refused)
_KLEIN_PRESET = {True: "flux2-klein", False: "flux2-klein-base"}

# What each sampling option means when neither the preset nor the user sets it (today's
# behaviour before these options existed).
_OFF = dict(negative_prompt=None, style_template="none", prompt_text="full", scheduler="model",
            ref_size=None, vae_fp32=False, round0_refs="none")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group(
        "published settings",
        "--preset bundles the options below (and sizes, steps, guidance, dtype) as the "
        "published code runs them; any flag given by hand wins and the plan says so")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="story-iter: the official Story-Iter settings (SDXL + IP-Adapter: "
                        "comic template, its negative prompt, DDIM 50 steps, guidance 5, "
                        "references resized to 256, fp16 with an fp32 VAE decode, 10 rounds "
                        "at 0.3..0.5); gsa: the GSA paper's (FLUX.1-dev, flow-matching Euler, "
                        "50 steps, guidance 3.5, GSA with the characters' reference images, "
                        "--lora STAGE1 STAGE2); flux2-klein: FLUX.2 [klein] distilled "
                        "(4 steps, no guidance); flux2-klein-base: the klein base model (50 "
                        "steps, CFG 4)")
    g.add_argument("--negative-prompt", metavar="TEXT",
                   help="text of the guidance branch (default: the story's negative_prompt "
                        "field, else zero embeddings as the stock pipeline uses; story-iter: "
                        f"{STORY_ITER_NEGATIVE!r}); '' for zero embeddings; SDXL only")
    g.add_argument("--style-template", metavar="NAME|TEXT",
                   help="wrap each frame's text: comic, film, realistic (the official "
                        "templates), none, or your own text containing {prompt} "
                        "(default none; story-iter: comic)")
    g.add_argument("--prompt-text", choices=["full", "prompt"],
                   help="what the template wraps: full = the frame's prompt + its characters' "
                        "descriptions + the story style (default); prompt = the frame's prompt "
                        "exactly (story-iter)")
    g.add_argument("--scheduler", choices=["ddim", "euler", "model"],
                   help="model = the one the model folder ships (default); ddim = the official "
                        "Story-Iter DDIM; euler = Euler (SDXL) / flow-matching Euler (FLUX)")
    g.add_argument("--ref-size", type=int, metavar="PX",
                   help="resize each reference to PXxPX before the image encoder's own "
                        "preprocessing (default: none; story-iter: 256); SDXL only")
    g.add_argument("--vae-fp32", action=argparse.BooleanOptionalAction, default=None,
                   help="decode the VAE in fp32 in a float16/bfloat16 run (story-iter: on)")
    g.add_argument("--round0-refs", choices=["none", "characters"],
                   help="FLUX: round 0 attends to the characters' reference images through "
                        "GSA (gsa: characters; default none: round 0 is text only)")


def _small_model(args) -> bool:
    """No --model (the tiny offline preset) or a model whose config was built for a small
    size: the run's own small-model defaults apply (plan.resolve), not the preset's sizes."""
    if args.model is None:
        return True
    native = native_size(args.backbone, Path(args.model))
    return native is not None and native < SMALL_BELOW


def style_template(spec: str) -> str:
    """A template name or a text with exactly one ``{prompt}``; returns the text."""
    if spec in STYLE_TEMPLATES:
        return STYLE_TEMPLATES[spec]
    if spec.count("{prompt}") != 1:
        raise UsageError(f"--style-template {spec!r}: give comic, film, realistic, none, or a "
                         "text containing {prompt} exactly once")
    return spec


def _explicit(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Dict[str, Any]:
    """The options given on the command line (not defaults): parse again with every default
    suppressed, so what comes back was typed by the user."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        return vars(parser.parse_args(list(argv)))
    finally:
        for a, d in saved:
            a.default = d


def _fmt(dest: str, v: Any) -> str:
    flag = "--" + dest.replace("_", "-")
    if isinstance(v, bool):
        return flag if v else f"no {flag}"
    return f"{flag} {v!r}" if isinstance(v, str) else f"{flag} {v}"


def apply(args, parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None,
          cuda: Optional[bool] = None) -> List[str]:
    """Fill ``args`` from ``--preset`` where the user gave nothing; resolve the sampling
    options' defaults; returns the plan's lines about it (``args.preset_info`` keeps the
    preset, its settings and the overrides for the manifest)."""
    argv = sys.argv[1:] if argv is None else argv
    notes: List[str] = []
    info: Dict[str, Any] = {"name": args.preset, "applied": {}, "overridden": {}, "kept": {}}
    # no --backbone: the model folder's model_index.json names it (else SDXL, as always)
    found = detect_backbone(args.model)
    if args.preset:
        given = _explicit(parser, argv)
        if "backbone" not in given:
            want = PRESETS[args.preset].get("backbone", args.backbone)
            if found is not None and want is not None and found != want:
                raise UsageError(f"--preset {args.preset} is for --backbone {want}, but --model "
                                 f"{args.model} is a {found} folder; give a {want} model folder "
                                 "or a preset for it")
            args.backbone = want
    if args.backbone is None:
        args.backbone = found or "sdxl"
    if args.preset in _KLEIN_PRESET.values() and found == "flux2":
        fit = _KLEIN_PRESET[is_distilled(Path(args.model))]
        if fit != args.preset:
            kind = "step-distilled" if fit == "flux2-klein" else "base (not distilled)"
            raise UsageError(f"--preset {args.preset}: --model {args.model} is the {kind} klein; "
                             f"use --preset {fit}")
    if args.preset:
        small = _small_model(args)
        if cuda is None:
            import torch

            cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cpu"
        for dest, value in PRESETS[args.preset].items():
            if dest in given:
                if given[dest] != value:
                    info["overridden"][dest] = [given[dest], value]
                continue
            if small and dest in _SIZE_KEYS:
                info["kept"][dest] = value   # a small model keeps its small-model defaults
                continue
            if dest == "dtype" and not cuda:
                info["kept"][dest] = value   # fp16 on a CPU is slow; float32 stays
                continue
            setattr(args, dest, value)
            info["applied"][dest] = value
        if args.preset == "gsa" and args.model is not None and len(args.lora) != 2:
            raise UsageError(f"--preset gsa loads the stage-1 and stage-2 LoRAs: give "
                             f"--lora STAGE1.safetensors STAGE2.safetensors "
                             f"(got {len(args.lora)} file(s))")
        notes.append(f"--preset {args.preset}: "
                     + ", ".join(_fmt(k, v) for k, v in info["applied"].items()))
        for k, (mine, theirs) in info["overridden"].items():
            notes.append(f"  {_fmt(k, mine)} given by hand overrides the preset's "
                         f"{_fmt(k, theirs)}")
        for k, v in info["kept"].items():
            why = ("a model built for a small size keeps its own defaults" if k in _SIZE_KEYS
                   else "on the CPU float32 stays")
            notes.append(f"  preset {_fmt(k, v)} not applied ({why}; give it by hand to use it)")
    for dest, value in _OFF.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    style_template(args.style_template)
    if args.ref_size is not None and args.ref_size < 1:
        raise UsageError(f"--ref-size must be >= 1, got {args.ref_size}")
    if args.backbone == "flux":
        if args.negative_prompt:
            raise UsageError("--negative-prompt: FLUX.1-dev's distilled guidance has no "
                             "negative branch; drop the option for --backbone flux")
    elif args.backbone == "flux2" and args.negative_prompt:
        raise UsageError("--negative-prompt: the FLUX.2 backbone runs the pipeline's own empty "
                         "negative prompt (klein base; the distilled klein has no CFG); drop "
                         "the option for --backbone flux2")
    if args.backbone in ("flux", "flux2"):
        if args.ref_size is not None:
            raise UsageError("--ref-size: FLUX references are VAE-encoded at the frame size; "
                             f"drop the option for --backbone {args.backbone}")
        if args.scheduler == "ddim":
            raise UsageError("--scheduler ddim is for SDXL; FLUX takes euler or model")
    elif args.round0_refs != "none":
        raise UsageError("--round0-refs characters is for --backbone flux or flux2 (SDXL's "
                         "round 0 has no reference weight); drop it")
    args.preset_info = info if args.preset else None
    return notes


def sampling_config(args, story) -> Dict[str, Any]:
    """The sampling options as the run uses them (the manifest's record).  Options left
    unset (``None``: parsed arguments that :func:`apply` has not seen) take their plain
    defaults."""
    opt = {k: (v if getattr(args, k, None) is None else getattr(args, k)) for k, v in _OFF.items()}
    neg = args.negative_prompt
    if neg is None and story.negative_prompt:
        neg = story.negative_prompt
    elif neg == "":
        neg = None   # given empty by hand: zero embeddings, whatever the story says
    return {"preset": args.preset, "negative_prompt": neg,
            "style_template": style_template(opt["style_template"]),
            "prompt_text": opt["prompt_text"], "scheduler": opt["scheduler"],
            "ref_size": args.ref_size, "vae_fp32": bool(opt["vae_fp32"]),
            "round0_refs": opt["round0_refs"]}


def config_fields(sampling: Dict[str, Any]) -> Dict[str, Any]:
    """The sampling options that differ from the plain defaults, for the run's config (the
    resume check compares it): folders made before these options existed still resume."""
    plain = dict(_OFF, style_template=STYLE_TEMPLATES["none"], preset=None)
    return {k: v for k, v in sampling.items() if v != plain.get(k)}


def frame_text(story, i: int, sampling: Dict[str, Any]) -> str:
    """The text frame ``i`` is drawn from."""
    base = story.frames[i].prompt if sampling["prompt_text"] == "prompt" else story.full_prompt(i)
    return sampling["style_template"].replace("{prompt}", base)


def configure_backbone(backbone, sampling: Dict[str, Any]):
    """Hand the sampling options to a backbone before ``load()``; returns it."""
    backbone.scheduler = sampling["scheduler"]
    backbone.vae_fp32 = sampling["vae_fp32"]
    if hasattr(backbone, "negative_prompt"):
        backbone.negative_prompt = sampling["negative_prompt"]
        backbone.ref_size = sampling["ref_size"]
    return backbone


# -- the plan's rows (see plan.PLAN_ROWS) ----------------------------------------------------


def _preset_row(p) -> Optional[str]:
    info = p.get("preset")
    if not info:
        return None
    over = ", ".join("--" + k.replace("_", "-") for k in info["overridden"])
    return info["name"] + (f" (given by hand over it: {over})" if over else "")


def _text_row(p) -> str:
    s = p["sampling"]
    what = "the prompt" if s["prompt_text"] == "prompt" else "prompt + characters + style"
    names = {v: k for k, v in STYLE_TEMPLATES.items()}
    t = names.get(s["style_template"], "custom")
    return what if t == "none" else f"{what} in the {t} template"


def _negative_row(p) -> Optional[str]:
    if p["config"]["backbone"] != "sdxl":
        return None
    neg = p["sampling"]["negative_prompt"]
    return repr(neg) if neg else "none (zero embeddings)"


def _scheduler_row(p) -> str:
    return {"model": "as the model ships", "ddim": "DDIM (official Story-Iter)",
            "euler": "Euler" if p["config"]["backbone"] == "sdxl"
            else "flow-matching Euler"}[p["sampling"]["scheduler"]]


PLAN_ROWS: List[Tuple[str, Callable[[Dict[str, Any]], Optional[str]]]] = [
    ("preset", _preset_row),
    ("frame text", _text_row),
    ("negative prompt", _negative_row),
    ("scheduler", _scheduler_row),
    ("reference size", lambda p: (f"{p['sampling']['ref_size']}x{p['sampling']['ref_size']} "
                                  "before the image encoder") if p["sampling"]["ref_size"]
     else None),
    ("round 0 references", lambda p: "the characters' images"
     if p["sampling"]["round0_refs"] == "characters" else None),
    ("vae decode", lambda p: "fp32" if p["sampling"]["vae_fp32"] else None),
]
