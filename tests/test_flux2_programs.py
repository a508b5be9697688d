"""The programs on FLUX.2 [klein] (issue 22 item 5): ``python -m pipelines.story_iter`` with
``--backbone flux2`` / a klein ``--model`` folder, and ``python -m pipelines.train`` on a klein
folder.  Tiny offline klein preset (64x64, random weights), 1-2 steps, a few frames."""
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

from pipelines.story_iter import main  # noqa: E402
from pipelines.tiny import get_tiny_flux2  # noqa: E402

STORY = {"title": "klein", "characters": [{"name": "Fox", "description": "a red fox"},
                                          {"name": "Owl", "description": "a grey owl"}],
         "frames": [{"prompt": "the fox runs", "characters": ["Fox"]},
                    {"prompt": "the owl flies", "characters": ["Owl"]},
                    {"prompt": "the fox sleeps", "characters": ["Fox"]}]}
SMALL = ["--rounds", "1", "--steps", "1", "--batch-size", "3", "--no-step-progress"]


@pytest.fixture(scope="module")
def klein():
    return get_tiny_flux2()


@pytest.fixture(scope="module")
def story_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("story") / "story.json"
    f.write_text(json.dumps(STORY))
    return str(f)


def _frame(out, r, i):
    from PIL import Image

    return np.asarray(Image.open(Path(out) / f"round_{r:02d}" / f"frame_{i:03d}.png")).astype(int)


def _redraw_round1_with_frame1_replaced(argv, out):
    """Replace round 0's frame 1 by another picture, delete round 1, resume: round 1 is
    drawn again from the changed references.  Returns (before, after) round-1 frames."""
    from PIL import Image

    before = [_frame(out, 1, i) for i in range(3)]
    img = Image.fromarray((255 - _frame(out, 0, 1)).astype(np.uint8))
    img.save(Path(out) / "round_00" / "frame_001.png")
    for p in (Path(out) / "round_01").glob("frame_*.png"):
        p.unlink()
    assert main(argv) == 0
    return before, [_frame(out, 1, i) for i in range(3)]


def test_story_iter_tiny_klein_topk_reads_only_its_page(klein, story_file, tmp_path, monkeypatch,
                                                        capsys):
    """--model DIR alone picks FLUX.2; --refs topk:1 gives each target its own frame only (the
    page table reaches replay), so changing frame 1 of round 0 changes round 1's frame 1 and
    nothing else."""
    from storyattn.flux2 import Flux2GroupSharedAttention

    seen = []
    replay = Flux2GroupSharedAttention.replay

    def spy(self, cache, ref_index=None, **kw):
        seen.append((len(cache), None if ref_index is None else ref_index.tolist()))
        return replay(self, cache, ref_index, **kw)

    monkeypatch.setattr(Flux2GroupSharedAttention, "replay", spy)
    out = tmp_path / "topk"
    argv = ["--model", klein, "--story", story_file, "--refs", "topk:1", "--out", str(out), *SMALL]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "backbone    flux2" in text and "references  topk:1" in text and "ETA" in text
    # round 1: one batch of 3 targets, each reading the entry of its own frame
    assert seen == [(3, [[0], [1], [2]])]
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["config"]["backbone"] == "flux2"
    assert m["rounds"]["1"]["num_refs"] == 3 and m["rounds"]["1"]["encoder_images"] == 3
    before, after = _redraw_round1_with_frame1_replaced(argv, out)
    assert np.abs(after[1] - before[1]).max() > 0
    assert np.array_equal(after[0], before[0]) and np.array_equal(after[2], before[2])


def test_story_iter_tiny_klein_all_reads_every_frame(story_file, tmp_path):
    """The same change with --refs all reaches every frame of round 1 (the control of the
    test above), on --backbone flux2 without --model (the tiny preset, announced)."""
    out = tmp_path / "all"
    argv = ["--backbone", "flux2", "--story", story_file, "--refs", "all", "--out", str(out),
            *SMALL]
    assert main(argv) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert any("TINY offline flux2 preset" in n for n in m["notes"])
    before, after = _redraw_round1_with_frame1_replaced(argv, out)
    assert all(np.abs(a - b).max() > 0 for a, b in zip(after, before))


@pytest.mark.parametrize("argv, msg", [
    (["--backbone", "flux"], "use --backbone flux2 (or leave --backbone out"),
    (["--backbone", "sdxl"], "use --backbone flux2"),
    (["--preset", "gsa"], "--preset gsa is for --backbone flux, but --model"),
    (["--preset", "flux2-klein-base"], "is the step-distilled klein; use --preset flux2-klein"),
    (["--negative-prompt", "blurry"], "drop the option for --backbone flux2"),
    (["--scheduler", "ddim"], "ddim is for SDXL"),
    (["--height", "36"], "must be a multiple of 8"),
])
def test_story_iter_klein_one_line_errors(klein, story_file, tmp_path, capsys, argv, msg):
    out = tmp_path / "err"
    assert main(["--model", klein, "--story", story_file, "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_klein_presets_and_defaults(klein, story_file):
    """The klein presets, and what a full-size folder gets without one (read from its
    model_index.json: distilled 4 steps / no guidance, base 50 steps / CFG 4)."""
    from pipelines.story_iter.cli import build_parser
    from pipelines.story_iter.model_folder import detect_backbone, is_distilled
    from pipelines.story_iter.plan import KLEIN
    from pipelines.story_iter.presets import PRESETS, apply

    assert PRESETS["flux2-klein"]["steps"] == 4 and PRESETS["flux2-klein"]["guidance"] == 1.0
    assert PRESETS["flux2-klein-base"]["steps"] == 50
    assert KLEIN[True] == {"steps": 4, "guidance": 1.0} and KLEIN[False]["steps"] == 50
    assert detect_backbone(klein) == "flux2" and is_distilled(Path(klein))
    ap = build_parser()
    argv = ["--story", story_file, "--preset", "flux2-klein", "--model", klein]
    args = ap.parse_args(argv)
    notes = apply(args, ap, argv, cuda=False)
    # a tiny folder keeps its small sizes and steps; guidance and backbone come from the preset
    assert (args.backbone, args.guidance, args.steps) == ("flux2", 1.0, None)
    assert notes[0].startswith("--preset flux2-klein:")


def test_flux2_lora_files_are_told_from_flux1(tmp_path):
    import torch
    from safetensors.torch import save_file

    from pipelines.cli_common import UsageError
    from pipelines.lora_files import check_lora_file, lora_targets

    k2 = "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight"
    k1 = "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight"
    shared = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    assert lora_targets([k2, shared]) == {"flux2"}
    assert lora_targets([k1, shared]) == {"flux"}
    assert lora_targets([shared]) == {"flux", "flux2"}
    f = tmp_path / "k2.safetensors"
    save_file({k2: torch.zeros(2, 2)}, str(f))
    check_lora_file(str(f), "flux2")
    with pytest.raises(UsageError, match="a FLUX2 LoRA.*use --backbone flux2"):
        check_lora_file(str(f), "flux")


# -- python -m pipelines.train on FLUX.2 [klein] -----------------------------------------------


def _train(argv):
    from pipelines.train.cli import main as train_main

    return train_main(argv)


@pytest.fixture(scope="module")
def klein_gsa_lora(tmp_path_factory):
    """Stage gsa, 2 steps on the tiny klein (a high learning rate so the LoRA is visible)."""
    out = tmp_path_factory.mktemp("train") / "gsa"
    assert _train(["--stage", "gsa", "--model", "tiny-flux2", "--max-steps", "2",
                   "--learning-rate", "1e-2", "--checkpoint-every", "0", "--cpu",
                   "--output-dir", str(out)]) == 0
    return out


def test_train_gsa_on_klein_saves_a_lora_that_loads_and_changes_the_output(klein, klein_gsa_lora):
    import torch
    from diffusers import Flux2KleinPipeline

    from pipelines.lora_files import LORA_WEIGHT_NAME, read_safetensors_keys
    from pipelines.tiny_flux2 import TINY_FLUX2_MAX_SEQUENCE_LENGTH

    keys = read_safetensors_keys(klein_gsa_lora / LORA_WEIGHT_NAME, "lora")
    # every FLUX.2 module kind is targeted: both attention types and the FFNs
    for part in ("attn.to_q.", "attn.add_k_proj.", "attn.to_add_out.", "ff.linear_in.",
                 "ff_context.linear_out.", "attn.to_qkv_mlp_proj.", "single_transformer_blocks.0"
                 ".attn.to_out."):
        assert any(part in k for k in keys), part
    summary = json.loads((klein_gsa_lora / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["last"]["step"] == 2
    pipe = Flux2KleinPipeline.from_pretrained(klein)

    def draw():
        return pipe(prompt="a red fox", height=64, width=64, num_inference_steps=1,
                    guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                    max_sequence_length=TINY_FLUX2_MAX_SEQUENCE_LENGTH, output_type="np").images

    plain = draw()
    pipe.load_lora_weights(str(klein_gsa_lora), adapter_name="gsa")
    assert "gsa" in pipe.transformer.peft_config
    assert np.abs(draw() - plain).max() > 1e-4


def test_story_iter_klein_with_the_trained_lora(klein, klein_gsa_lora, story_file, tmp_path):
    """The stage-gsa file is a FLUX.2 LoRA to story_iter (loaded and applied), refused by FLUX."""
    from pipelines.lora_files import LORA_WEIGHT_NAME

    lora = str(klein_gsa_lora / LORA_WEIGHT_NAME)
    out = tmp_path / "lora"
    assert main(["--model", klein, "--story", story_file, "--lora", lora, "--frames", "2",
                 "--out", str(out), *SMALL]) == 0
    assert json.loads((out / "manifest.json").read_text())["config"]["loras"] == [
        str(Path(lora).resolve())]
    assert main(["--backbone", "flux", "--story", story_file, "--lora", lora,
                 "--out", str(tmp_path / "no")]) == 2


def test_train_dpo_on_klein_one_step(klein_gsa_lora, tmp_path):
    out = tmp_path / "dpo"
    assert _train(["--stage", "dpo", "--model", "tiny-flux2", "--stage1-lora", str(klein_gsa_lora),
                   "--max-steps", "1", "--checkpoint-every", "0", "--cpu",
                   "--output-dir", str(out)]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["adapter"] == "dpo" and summary["last"]["step"] == 1


def test_train_klein_one_line_errors(klein, tmp_path, capsys):
    """A FLUX.1 stage-1 LoRA on the klein, and a non-FLUX folder, are one line each."""
    import torch
    from safetensors.torch import save_file

    f1 = tmp_path / "flux1.safetensors"
    save_file({"transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": torch.zeros(2, 2),
               "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": torch.zeros(2, 2)},
              str(f1))
    assert _train(["--stage", "dpo", "--model", klein, "--stage1-lora", str(f1), "--cpu",
                   "--data", "synthetic", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "a FLUX LoRA, it does not apply to the FLUX2 backbone; give a FLUX2 LoRA" in err
    assert len(err.splitlines()) == 1
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    assert _train(["--stage", "gsa", "--model", str(other), "--cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "or FLUX.2 klein (Flux2KleinPipeline) folder" in err and len(err.splitlines()) == 1


def test_klein_backbone_batch_scope_draws_what_round_scope_draws(klein):
    """A cache too small for the round (re-recorded per batch, other entry numbers) draws the
    same frames as the whole round recorded once: reference j sits at T = 10 (j + 1)."""
    import torch
    from PIL import Image

    from pipelines.backbones.flux2 import Flux2Backbone

    rng = np.random.default_rng(0)
    refs = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    prompts, pages = ["a fox", "an owl"], [[2], [0, 2]]
    outs = []
    for budget in (None, 0):
        bb = Flux2Backbone(klein, height=64, width=64, steps=1, step_progress=False,
                           cache_budget_bytes=budget)
        bb.load()
        info = bb.begin_round(refs, 0.0)
        imgs = bb.draw(prompts, [torch.Generator().manual_seed(0) for _ in prompts], pages)
        bb.end_round()
        outs.append((info["cache_scope"], bb.encoder_images, [np.asarray(i).astype(int) for i in imgs]))
    assert [o[0] for o in outs] == ["round", "batch"]
    assert outs[0][1] == 3 and outs[1][1] == 2      # the batch scope recorded only frames 0, 2
    # exactly: with the references placed by entry number instead (T = 10 (entry + 1)) the
    # same frames differ (by 1 in 255 on these random tiny weights), so 0 is the check
    assert all(np.abs(a - b).max() == 0 for a, b in zip(outs[0][2], outs[1][2]))
