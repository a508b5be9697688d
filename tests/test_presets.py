"""``--preset story-iter`` against an independent re-implementation of the official loop.

The reference below is written from a reading of the official Story-Iter code
(UCSC-VLAA/story-iter ``run.py`` and ``ip_adapter/ip_adapter.py``), on diffusers' stock
``StableDiffusionXLPipeline`` with the IP-Adapter installed as the official package does
it: its own attention processors (text attention + ``scale`` x attention over every
reference's image tokens, concatenated after the text tokens), its own image projection,
the references' tokens concatenated to ``prompt_embeds`` and the projection of a zero
embedding to ``negative_prompt_embeds``, the negative prompt encoded with its pooled
embedding, the comic template, DDIM, references resized to 256x256, one seed for every
frame and round.  Nothing of ``storyattn`` or ``pipelines.story_iter`` runs in it.

The issue's check: a story whose frames carry only prompts, ``--preset story-iter --seed S
--frames 4 --rounds 3 --steps 4 --height 64 --width 64 --dtype float32`` on the tiny SDXL
preset reproduces the reference to within 1/255 per pixel in every round (~60 s).
"""
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from pipelines.cli_common import UsageError  # noqa: E402
from pipelines.story_iter import main  # noqa: E402
from pipelines.story_iter.cli import build_parser  # noqa: E402
from pipelines.story_iter.presets import apply, frame_text, sampling_config  # noqa: E402

PROMPTS = ["a snowman in a field", "a fox in the woods", "the fox meets the snowman",
           "snow falls on the hill"]
SEED, ROUNDS, STEPS, SIZE = 7, 3, 4, 64
CHECK = ["--preset", "story-iter", "--seed", str(SEED), "--frames", "4", "--rounds",
         str(ROUNDS), "--steps", str(STEPS), "--height", str(SIZE), "--width", str(SIZE),
         "--dtype", "float32", "--no-step-progress"]
# the same settings given one by one (what the preset must expand to)
BY_HAND = ["--backbone", "sdxl", "--negative-prompt",
           "monochrome, lowres, bad anatomy, worst quality, low quality",
           "--style-template", "comic", "--prompt-text", "prompt", "--scheduler", "ddim",
           "--ref-size", "256", "--vae-fp32", "--guidance", "5", "--scales", "0.3:0.5",
           "--refs", "all", "--seed", str(SEED), "--frames", "4", "--rounds", str(ROUNDS),
           "--steps", str(STEPS), "--height", str(SIZE), "--width", str(SIZE),
           "--dtype", "float32", "--no-step-progress"]


# -- the reference ------------------------------------------------------------------------


def _comic(prompt):
    return ("best quality, high quality, comic " + prompt
            + " . graphic illustration, comic art, graphic novel art, vibrant, highly detailed")


class _SelfAttn(nn.Module):
    """Self-attention layers keep diffusers' plain processor (a module, so that the
    adapter's state-dict numbering over all processors lines up)."""

    def __init__(self):
        super().__init__()
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class _IPAttn(nn.Module):
    """Cross-attention: the first ``text_len`` context tokens are text, the rest image
    tokens of all references; output = attn(text) + scale * attn(image tokens)."""

    def __init__(self, hidden, cross, text_len):
        super().__init__()
        self.to_k_ip = nn.Linear(cross, hidden, bias=False)
        self.to_v_ip = nn.Linear(cross, hidden, bias=False)
        self.text_len, self.scale = text_len, 1.0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        assert attn.spatial_norm is None and attn.group_norm is None and attention_mask is None
        residual = hidden_states
        four_d = hidden_states.ndim == 4
        if four_d:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        b = hidden_states.shape[0]
        text = encoder_hidden_states[:, :self.text_len]
        image = encoder_hidden_states[:, self.text_len:]
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        heads = attn.heads
        q = attn.to_q(hidden_states)
        d = q.shape[-1] // heads

        def split(x):
            return x.view(b, -1, heads, d).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(attn.to_k(text)),
                                             split(attn.to_v(text)))
        out = out.transpose(1, 2).reshape(b, -1, heads * d)
        if image.shape[1]:
            ip = F.scaled_dot_product_attention(split(q), split(self.to_k_ip(image)),
                                                split(self.to_v_ip(image)))
            out = out + self.scale * ip.transpose(1, 2).reshape(b, -1, heads * d)
        out = attn.to_out[1](attn.to_out[0](out))
        if four_d:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class _ImageProj(nn.Module):
    def __init__(self, clip_dim, cross, tokens):
        super().__init__()
        self.proj = nn.Linear(clip_dim, tokens * cross)
        self.norm = nn.LayerNorm(cross)
        self.tokens, self.cross = tokens, cross

    def forward(self, x):
        return self.norm(self.proj(x).reshape(-1, self.tokens, self.cross))


def _reference_rounds(model_dir, prompts, seed, rounds, steps, size):
    """Every round's frames (uint8 arrays) of the official loop, re-implemented."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from pipelines import tiny

    ip_dir = Path(model_dir) / tiny.SDXL_IP_ADAPTER_SUBFOLDER
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, scheduler=sched,
                                                     torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    boc = unet.config.block_out_channels
    text_len = pipe.tokenizer.model_max_length
    procs = {}
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            procs[name] = _SelfAttn()
            continue
        if name.startswith("mid_block"):
            hidden = boc[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(boc))[int(name[len("up_blocks.")])]
        else:
            hidden = boc[int(name[len("down_blocks.")])]
        procs[name] = _IPAttn(hidden, unet.config.cross_attention_dim, text_len)
    unet.set_attn_processor(procs)
    sd = load_file(str(ip_dir / tiny.SDXL_IP_ADAPTER_WEIGHT_NAME))
    ip_sd = {k[len("ip_adapter."):]: v for k, v in sd.items() if k.startswith("ip_adapter.")}
    nn.ModuleList(unet.attn_processors.values()).load_state_dict(ip_sd)
    enc_dir = ip_dir / tiny.SDXL_IMAGE_ENCODER_FOLDER
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(enc_dir)).eval()
    # the official code builds CLIPImageProcessor() with its defaults, which are the real
    # encoder's settings; the tiny encoder (32x32) ships its own
    processor = CLIPImageProcessor.from_pretrained(str(enc_dir))
    proj = _ImageProj(encoder.config.projection_dim, unet.config.cross_attention_dim,
                      tiny.SDXL_IP_ADAPTER_NUM_TOKENS)
    proj.load_state_dict({k[len("image_proj."):]: v for k, v in sd.items()
                          if k.startswith("image_proj.")})
    negative = "monochrome, lowres, bad anatomy, worst quality, low quality"

    @torch.no_grad()
    def frame(prompt, refs, scale):
        for p in unet.attn_processors.values():
            if isinstance(p, _IPAttn):
                p.scale = scale
        pe, npe, pooled, npooled = pipe.encode_prompt(
            [_comic(prompt)], num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=[negative])
        if refs is not None:
            emb = encoder(processor(images=refs, return_tensors="pt").pixel_values).image_embeds
            tok = proj(emb).reshape(1, -1, unet.config.cross_attention_dim)
            neg_tok = proj(torch.zeros_like(emb)).reshape(1, -1, unet.config.cross_attention_dim)
            pe, npe = torch.cat([pe, tok], 1), torch.cat([npe, neg_tok], 1)
        # no guidance_scale: the official generate() does not pass its own on, so the
        # pipeline's default (5.0) runs
        return pipe(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=npooled, height=size, width=size,
                    num_inference_steps=steps,
                    generator=torch.Generator("cpu").manual_seed(seed)).images[0]

    out = []
    images = [frame(p, None, 0.3) for p in prompts]
    out.append([np.asarray(im) for im in images])
    for scale in np.linspace(0.3, 0.5, rounds):
        refs = [im.resize((256, 256)) for im in images]
        images = [frame(p, refs, float(scale)) for p in prompts]
        out.append([np.asarray(im) for im in images])
    return out


# -- the checks ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def story_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("story") / "prompts.json"
    f.write_text(json.dumps({"title": "prompts only", "frames": PROMPTS}))
    return f


def _frames(out, rounds, n):
    from PIL import Image

    return [[np.asarray(Image.open(Path(out) / f"round_{r:02d}" / f"frame_{i:03d}.png"))
             for i in range(n)] for r in range(rounds + 1)]


def _max_diff(a, b):
    return max(int(np.abs(x.astype(np.int16) - y.astype(np.int16)).max())
               for ra, rb in zip(a, b) for x, y in zip(ra, rb))


@pytest.fixture(scope="module")
def preset_run(story_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("preset") / "run"
    assert main(["--story", str(story_file), "--out", str(out), *CHECK]) == 0
    return out


def test_preset_reproduces_the_official_loop(preset_run):
    from pipelines import tiny

    ref = _reference_rounds(tiny.get_tiny_sdxl(), PROMPTS, SEED, ROUNDS, STEPS, SIZE)
    ours = _frames(preset_run, ROUNDS, len(PROMPTS))
    per_round = [_max_diff([a], [b]) for a, b in zip(ours, ref)]
    print("max pixel difference per round (0-255):", per_round)
    assert all(d <= 1 for d in per_round), per_round
    # the rounds do differ from each other (the references are attended to)
    assert _max_diff([ours[0]], [ours[ROUNDS]]) > 1
    m = json.loads((preset_run / "manifest.json").read_text())
    assert m["preset"]["name"] == "story-iter"
    assert m["sampling"]["scheduler"] == "ddim" and m["sampling"]["ref_size"] == 256
    assert m["prompts"][0] == _comic(PROMPTS[0])
    assert m["round_scales"] == pytest.approx([0.0, 0.3, 0.4, 0.5])
    # the flags given by hand are recorded as overriding the preset
    assert m["preset"]["overridden"]["steps"] == [STEPS, 50]


def _resolved(argv):
    ap = build_parser()
    args = ap.parse_args(argv)
    notes = apply(args, ap, argv, cuda=False)
    return args, notes


def test_preset_equals_the_same_settings_by_hand(story_file):
    """The preset expands to exactly these flags: same resolved options, same texts."""
    from pipelines.story import load_story

    story = load_story(story_file)
    a, notes = _resolved(["--story", str(story_file), *CHECK])
    b, _ = _resolved(["--story", str(story_file), *BY_HAND])
    keys = ("backbone", "negative_prompt", "style_template", "prompt_text", "scheduler",
            "ref_size", "vae_fp32", "guidance", "scales", "refs", "seed", "seed_per_frame",
            "rounds", "steps", "height", "width", "dtype")
    assert {k: getattr(a, k) for k in keys} == {k: getattr(b, k) for k in keys}
    sa, sb = sampling_config(a, story), sampling_config(b, story)
    assert sa == dict(sb, preset="story-iter")
    assert [frame_text(story, i, sa) for i in range(4)] == [_comic(p) for p in PROMPTS]
    # the plan names the preset and each flag given by hand over it
    assert notes[0].startswith("--preset story-iter:")
    assert any("--steps 4 given by hand overrides the preset's --steps 50" in n for n in notes)
    assert any("--dtype 'float32' given by hand" in n for n in notes)


@pytest.mark.slow  # a second full 4 x 4 run (~45 s): the fast test above checks the expansion
def test_preset_and_by_hand_draw_identical_frames(preset_run, story_file, tmp_path):
    out = tmp_path / "hand"
    assert main(["--story", str(story_file), "--out", str(out), *BY_HAND]) == 0
    assert _max_diff(_frames(preset_run, ROUNDS, 4), _frames(out, ROUNDS, 4)) == 0


def test_sampling_options_validate(story_file, capsys):
    for bad, msg in ((["--style-template", "no placeholder"], "{prompt} exactly once"),
                     (["--ref-size", "0"], "--ref-size must be >= 1"),
                     (["--backbone", "flux", "--negative-prompt", "x"], "no negative branch"),
                     (["--backbone", "flux", "--scheduler", "ddim"], "ddim is for SDXL"),
                     (["--round0-refs", "characters"], "is for --backbone flux"),
                     (["--preset", "gsa", "--model", str(story_file.parent)],
                      "--lora STAGE1.safetensors STAGE2.safetensors")):
        with pytest.raises(UsageError) as e:
            _resolved(["--story", str(story_file), *bad])
        assert msg in str(e.value)


def test_gsa_preset_settings(story_file):
    a, notes = _resolved(["--story", str(story_file), "--preset", "gsa", "--model", "/m",
                          "--lora", "s1.safetensors", "s2.safetensors"])
    assert (a.backbone, a.scheduler, a.steps, a.guidance, a.refs, a.round0_refs) == (
        "flux", "euler", 50, 3.5, "all", "characters")
    assert notes[0].startswith("--preset gsa:") and "--scheduler 'euler'" in notes[0]
    # without --model (tiny demo) the sizes stay the small model's and the plan says so
    a, notes = _resolved(["--story", str(story_file), "--preset", "gsa"])
    assert a.steps is None and any("built for a small size" in n for n in notes)


def test_custom_template_and_story_negative_prompt(tmp_path):
    from pipelines.story import load_story

    f = tmp_path / "s.json"
    f.write_text(json.dumps({"title": "t", "style": "ink", "negative_prompt": "blurry",
                             "characters": [{"name": "Fox", "description": "a red fox"}],
                             "frames": [{"prompt": "runs", "characters": ["Fox"]}]}))
    story = load_story(f)
    a, _ = _resolved(["--story", str(f), "--style-template", "<{prompt}>"])
    s = sampling_config(a, story)
    assert s["negative_prompt"] == "blurry"
    assert frame_text(story, 0, s) == "<runs, a red fox, ink>"
    a, _ = _resolved(["--story", str(f), "--negative-prompt", "", "--prompt-text", "prompt"])
    s = sampling_config(a, story)
    assert s["negative_prompt"] is None and frame_text(story, 0, s) == "runs"


def test_gsa_preset_attends_to_character_images_from_round_0(tmp_path):
    """--preset gsa on the tiny FLUX preset: round 0 already reads the characters' reference
    images through GSA (``--round0-refs characters``); without them it is text only."""
    from PIL import Image

    Image.new("RGB", (48, 48), (230, 90, 20)).save(tmp_path / "fox.png")
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"title": "t", "characters": [
        {"name": "Fox", "description": "a red fox", "reference_images": ["fox.png"]}],
        "frames": [{"prompt": "a fox runs", "characters": ["Fox"]}, "a snowy hill"]}))
    small = ["--story", str(f), "--rounds", "0", "--steps", "1", "--height", "64", "--width",
             "64", "--no-step-progress"]
    assert main([*small, "--preset", "gsa", "--out", str(tmp_path / "gsa")]) == 0
    m = json.loads((tmp_path / "gsa" / "manifest.json").read_text())
    assert m["config"]["backbone"] == "flux" and m["sampling"]["scheduler"] == "euler"
    assert m["sampling"]["round0_refs"] == "characters"
    assert (m["rounds"]["0"]["num_refs"], m["rounds"]["0"]["encoder_images"]) == (1, 1)
    assert main([*small, "--preset", "gsa", "--round0-refs", "none",
                 "--out", str(tmp_path / "plain")]) == 0
    m = json.loads((tmp_path / "plain" / "manifest.json").read_text())
    assert m["rounds"]["0"]["num_refs"] == 0
    assert _max_diff(_frames(tmp_path / "gsa", 0, 2), _frames(tmp_path / "plain", 0, 2)) > 0


def test_vae_fp32_decode_in_a_bfloat16_run():
    """--vae-fp32: the VAE of a bf16 pipeline decodes bf16 latents exactly as an fp32 VAE
    loaded on its own decodes the same latents in fp32 (its weights reloaded in fp32, not
    the bf16-rounded ones) (and --scheduler ddim is the DDIM
    the official code builds)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline

    from pipelines import tiny
    from pipelines.backbones.sampling import decode_vae_in_fp32, set_scheduler

    path = tiny.get_tiny_sdxl()
    pipe = StableDiffusionXLPipeline.from_pretrained(path, torch_dtype=torch.bfloat16)
    decode_vae_in_fp32(pipe, path)
    assert pipe.vae.dtype == torch.float32
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    ref_vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
    with torch.no_grad():
        got = pipe.vae.decode(z).sample
        want = ref_vae.decode(z.float()).sample
    assert got.dtype == torch.float32 and torch.equal(got, want)
    set_scheduler(pipe, "ddim", "sdxl")
    c = pipe.scheduler.config
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert (c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule, c.clip_sample,
            c.set_alpha_to_one, c.steps_offset) == (1000, 0.00085, 0.012, "scaled_linear",
                                                    False, False, 1)
    set_scheduler(pipe, "euler", "sdxl")
    from diffusers import EulerDiscreteScheduler

    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.scheduler.config.beta_end == 0.012   # built from the config it replaced
