"""``python -m pipelines.story_iter`` end to end on the tiny offline presets (CPU).

4 frames x (1 + 2) rounds x 2 steps at 64x64: outputs, manifest, encoder calls (N per
round), resume after an interruption (identical images, finished frames untouched), a
refused resume into a folder made with another config, the preflight refusal, malformed
stories, the FLUX backbone, and a 2-process run equal to the single-process one (~40 s).
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from pipelines.story import demo_story, parse_story  # noqa: E402
from pipelines.story_iter import STOP_ENV, main, round_scales, select_refs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N, R = 4, 2

STORY = {
    "title": "Tiny test story",
    "style": "watercolor",
    "characters": [
        {"name": "Snowman", "description": "a snowman with a carrot nose"},
        {"name": "Fox", "description": "a red fox"},
    ],
    "frames": [
        {"prompt": "a snowman in a field", "characters": ["Snowman"]},
        {"prompt": "a fox in the woods", "characters": ["Fox"]},
        {"prompt": "the fox meets the snowman", "characters": ["Snowman", "Fox"]},
        {"prompt": "snow falls on the hill", "characters": []},
    ],
}


@pytest.fixture(scope="module")
def story_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("story")
    f = d / "story.json"
    f.write_text(json.dumps(STORY))
    return f


def _args(story_file, out, *extra):
    return ["--story", str(story_file), "--rounds", str(R), "--steps", "2", "--height", "64",
            "--width", "64", "--batch-size", "2", "--no-step-progress", "--out", str(out),
            *extra]


def _digests(out):
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(out).glob("round_*/frame_*.png"))}


@pytest.fixture(scope="module")
def sdxl_run(story_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl") / "run"
    assert main(_args(story_file, out)) == 0
    return out


def test_outputs_and_manifest(sdxl_run):
    out = sdxl_run
    frames = _digests(out)
    assert len(frames) == N * (R + 1)
    for r in range(R + 1):
        for i in range(N):
            assert f"round_{r:02d}/frame_{i:03d}.png" in frames
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete"
    cfg = m["config"]
    assert (cfg["frames"], cfg["rounds"], cfg["steps"], cfg["backbone"]) == (N, R, 2, "sdxl")
    assert m["versions"]["torch"] and m["versions"]["diffusers"]
    assert m["seeds"] == [0] * N
    assert m["round_scales"] == pytest.approx([0.0, 0.3, 0.5])
    for r in range(R + 1):
        st = m["rounds"][str(r)]
        assert st["frames_drawn"] == N
        assert st["wall_s"] > 0
        assert st["peak_memory_bytes"] > 0
        # N images through the image encoder per refinement round, not N x N
        assert st["encoder_images"] == (0 if r == 0 else N)
        assert (st["cache_bytes"] > 0) == (r > 0)
    assert m["sessions"][0]["preflight"]["total"] > 0
    html = (out / "index.html").read_text()
    assert html.count("<tr>") == R + 2  # header + one row per round
    assert html.count("<img ") == N * (R + 1)
    # no leftovers: temporary files and per-process stats are gone
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("_stats_rank*.json"))
    # the refinement rounds changed the pictures (references are attended to)
    assert frames["round_00/frame_000.png"] != frames["round_01/frame_000.png"]


def test_resume_after_interruption_is_identical(sdxl_run, story_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(STOP_ENV, "5")  # stop after 5 frames: mid round 1, mid batch pair
    with pytest.raises(SystemExit) as ei:
        main(_args(story_file, out))
    assert ei.value.code == 75
    done = _digests(out)
    assert len(done) == 5
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "running"
    mtimes = {k: (out / k).stat().st_mtime_ns for k in done}

    monkeypatch.delenv(STOP_ENV)
    assert main(_args(story_file, out)) == 0
    # finished frames were not redone (not rewritten)
    assert {k: (out / k).stat().st_mtime_ns for k in done} == mtimes
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and len(m["sessions"]) == 2 and m["sessions"][1]["resumed"]
    assert m["rounds"]["1"]["frames_drawn"] == N - 1
    assert m["rounds"]["1"]["encoder_images"] == N
    # identical to the uninterrupted run, byte for byte
    assert _digests(out) == _digests(sdxl_run)

    # a third run has nothing left to do and changes nothing
    before = _digests(out)
    assert main(_args(story_file, out)) == 0
    assert _digests(out) == before


def test_resume_refuses_other_config(sdxl_run, story_file, capsys):
    rc = main(_args(story_file, sdxl_run, "--seed", "7"))
    assert rc == 3
    err = capsys.readouterr().err
    assert "refusing to resume" in err and "seed: 0 in the folder, 7 now" in err


def test_refuses_foreign_folder(story_file, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(_args(story_file, tmp_path)) == 3
    assert "not a story_iter output folder" in capsys.readouterr().err


def test_preflight_refusal(story_file, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(_args(story_file, out, "--max-memory", "0.05"))
    assert rc == 4
    err = capsys.readouterr().err
    assert "preflight: this run needs about" in err and "Nothing was loaded" in err
    assert "weights" in err and "caches" in err and "activations" in err
    assert "--height 32 --width 32" in err and "--batch-size 1" in err
    assert not (out / "round_00").exists()


def test_preflight_suggests_topk_for_flux():
    from pipelines.story_iter.memory import GiB, MemoryPlan, PreflightError, check_fits
    from pipelines.tiny import get_tiny_flux

    plan = MemoryPlan(backbone="flux", model=get_tiny_flux(), frames=100, batch_size=4,
                      height=1024, width=1024, guidance=3.5, refs="all")
    with pytest.raises(PreflightError) as ei:
        check_fits(plan, available=int(1.0 * GiB), source="test")
    msg = str(ei.value)
    assert "--refs topk:3" in msg and "--batch-size 2" in msg and "--height 512 --width 512" in msg


def test_malformed_story(tmp_path, capsys):
    bad = dict(STORY, frames=STORY["frames"] + [{"prompt": "x", "characters": ["Foxx"]}])
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(bad))
    assert main(["--story", str(f), "--out", str(tmp_path / "o")]) == 2
    assert "frames[4].characters[0]: unknown character 'Foxx'" in capsys.readouterr().err


def test_select_refs_and_scales():
    s = parse_story(STORY)
    assert select_refs(s, 0, "all") == [0, 1, 2, 3]
    # frame 2 has both characters: frames 2 (2 shared), then 0/1 (1 shared, distance 2/1)
    assert select_refs(s, 2, "topk:2") == [1, 2]
    assert select_refs(s, 0, "topk:2") == [0, 2]
    assert select_refs(s, 3, "window:2") == [2, 3]
    assert select_refs(s, 1, "window:3") == [0, 1, 2]
    d = demo_story()
    assert len(select_refs(d, 50, "topk:5")) == 5
    assert round_scales(0.3, 0.5, 10)[1] == pytest.approx(0.3)
    assert round_scales(0.3, 0.5, 10)[10] == pytest.approx(0.5)
    assert len(round_scales(0.3, 0.5, 10)) == 11
    with pytest.raises(ValueError, match="topk:K"):
        select_refs(s, 0, "top3")


def test_round0_character_refs_are_each_frames_own(tmp_path):
    """--round0-refs characters: a frame reads the images of the characters it names (all of
    them when it names none); later rounds read the previous round plus the named ones."""
    from PIL import Image

    from pipelines.story_iter.refs import round_refs

    s = parse_story(STORY)
    imgs = [Image.new("RGB", (8, 8), c) for c in ((250, 250, 250), (200, 60, 0))]
    owner = ["Snowman", "Fox"]
    refs, prompts, per, regions = round_refs(s, 0, tmp_path, 4, "topk:2", imgs, owner,
                                             [f["prompt"] for f in STORY["frames"]],
                                             round0_chars=True)
    assert len(refs) == 2 and prompts[1].startswith("Fox, a red fox")
    assert per == [[0], [1], [0, 1], [0, 1]] and regions is None    # no layout in this story
    assert round_refs(s, 0, tmp_path, 4, "topk:2", imgs, owner, ["p"] * 4) == ([], [], None,
                                                                               None)


def test_round_refs_carry_each_characters_box(tmp_path):
    """A story with a layout: each character image a frame reads comes with the box of that
    character in that frame (None where the frame gives it none); previous-round frames get
    None (they show the whole scene)."""
    import copy

    from PIL import Image

    from pipelines.run_folder import frame_path
    from pipelines.story_iter.refs import round_refs

    obj = copy.deepcopy(STORY)
    obj["frames"][2]["regions"] = {"Snowman": [0.0, 0.0, 0.5, 1.0], "Fox": [0.5, 0.2, 1.0, 1.0]}
    s = parse_story(obj)
    imgs = [Image.new("RGB", (8, 8), c) for c in ((250, 250, 250), (200, 60, 0))]
    owner = ["Snowman", "Fox"]
    texts = [f["prompt"] for f in obj["frames"]]
    _, _, per, regions = round_refs(s, 0, tmp_path, 4, "topk:2", imgs, owner, texts,
                                    round0_chars=True)
    assert per[2] == [0, 1]
    assert regions == [[None], [None], [(0.0, 0.0, 0.5, 1.0), (0.5, 0.2, 1.0, 1.0)],
                       [None, None]]
    for i in range(4):
        p = frame_path(tmp_path, 0, i)
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(p)
    refs, _, per, regions = round_refs(s, 1, tmp_path, 4, "all", imgs, owner, texts)
    assert len(refs) == 6 and per[2] == list(range(6))
    assert regions[2] == [None] * 4 + [(0.0, 0.0, 0.5, 1.0), (0.5, 0.2, 1.0, 1.0)]


def _solo_story():
    """Six frames with a layout: Snowman alone in 0, 2, 4, Fox alone in 1, 3, both in 5."""
    box_l, box_r = [0.0, 0.25, 0.5, 1.0], [0.5, 0.25, 1.0, 1.0]
    frames = []
    for i, who in enumerate([["Snowman"], ["Fox"], ["Snowman"], ["Fox"], ["Snowman"],
                             ["Snowman", "Fox"]]):
        regions = {n: (box_l if j == 0 else box_r) for j, n in enumerate(who)}
        frames.append({"prompt": f"frame {i}", "characters": who, "regions": regions})
    return parse_story(dict(STORY, frames=frames))


def _write_round(tmp_path, r, colours):
    """Round r's frames: frame i has colours[i] in its left half, grey elsewhere."""
    from PIL import Image

    from pipelines.run_folder import frame_path

    for i, c in enumerate(colours):
        im = Image.new("RGB", (16, 16), (128, 128, 128))
        im.paste(Image.new("RGB", (8, 12), c), (0, 4))
        p = frame_path(tmp_path, r, i)
        p.parent.mkdir(parents=True, exist_ok=True)
        im.save(p)


def test_solo_refs_pick_the_consensus_frame_of_each_character(tmp_path):
    """--refs solo:K: per character, the K previous-round frames showing it alone nearest the
    median crop of its box; each frame reads its characters' picks and images, each inside
    that character's box in the frame."""
    from PIL import Image

    from pipelines.story_iter.refs import round_refs, solo_choice

    s = _solo_story()
    white, red, blue = (250, 250, 250), (220, 30, 30), (30, 30, 220)
    # Snowman drawn white, red (off-model), white; Fox blue twice (a tie: the earlier wins)
    _write_round(tmp_path, 0, [white, blue, red, blue, white, white])
    prev = [Image.open(tmp_path / "round_00" / f) for f in sorted(
        os.listdir(tmp_path / "round_00"))]
    assert solo_choice(s, [im.convert("RGB") for im in prev], 6, 1) == {"Snowman": [0],
                                                                        "Fox": [1]}
    assert solo_choice(s, [im.convert("RGB") for im in prev], 6, 2)["Snowman"] == [0, 4]
    imgs = [Image.new("RGB", (16, 16), c) for c in (white, blue)]
    owner = ["Snowman", "Fox"]
    refs, prompts, per, regions = round_refs(s, 1, tmp_path, 6, "solo:1", imgs, owner,
                                             [f.prompt for f in s.frames])
    # only the picked frames are read back (0 and 1), then the character images
    assert len(refs) == 4 and prompts[:2] == ["frame 0", "frame 1"]
    assert per == [[0, 2], [1, 3], [0, 2], [1, 3], [0, 2], [0, 2, 1, 3]]
    left, right = (0.0, 0.25, 0.5, 1.0), (0.5, 0.25, 1.0, 1.0)
    assert regions[1] == [left, left] and regions[5] == [left, left, right, right]
    # a character never alone gets no pick: it reads its image only
    _write_round(tmp_path, 1, [white] * 6)
    s2 = parse_story(dict(STORY, frames=[{"prompt": "a", "characters": ["Snowman"],
                                          "regions": {"Snowman": [0, 0, 0.5, 1]}},
                                         {"prompt": "b", "characters": ["Snowman", "Fox"]}]))
    refs, _, per, regions = round_refs(s2, 2, tmp_path, 2, "solo:1", imgs, owner, ["a", "b"])
    assert len(refs) == 3 and per == [[0, 1], [0, 1, 2]]
    assert regions[1] == [None, None, None]          # frame b has no layout


def test_solo_refs_need_a_layout(story_file, tmp_path, capsys):
    assert main(_args(story_file, tmp_path / "o", "--backbone", "flux", "--refs", "solo:1")) == 2
    err = capsys.readouterr().err
    assert "--refs solo:1" in err and "regions" in err and "Traceback" not in err


def test_solo_refs_memory_plan_counts_picks_per_character():
    from pipelines.story_iter.memory import refs_per_target

    assert refs_per_target("solo:2", 100, characters=3) == 6
    assert refs_per_target("solo:2", 4, characters=3) == 4
    assert refs_per_target("topk:2", 100, characters=3) == 2


def test_flux_backbone_small_run(story_file, tmp_path):
    out = tmp_path / "flux"
    assert main(_args(story_file, out, "--backbone", "flux", "--refs", "topk:2")) == 0
    assert len(_digests(out)) == N * (R + 1)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["config"]["refs"] == "topk:2"
    for r in range(1, R + 1):
        st = m["rounds"][str(r)]
        assert st["encoder_images"] == N  # round r-1's frames through the VAE once
        assert st["cache_bytes"] > 0 and st["cache_scope"] == "round"
    assert m["rounds"]["0"]["encoder_images"] == 0


def _launch_two(args, env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29500 + os.getpid() % 1000), "-m", "pipelines.story_iter", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_equal_single(story_file, tmp_path):
    """2 CPU processes (gloo) split each round's batches and gather through the disk; the
    frames equal a single-process run's byte for byte.  Both runs use one thread per
    process (torchrun's default): CPU kernels may sum in another order with another thread
    count, which changes the last bits, so the comparison holds the thread count fixed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    one = tmp_path / "one"
    res = subprocess.run([sys.executable, "-m", "pipelines.story_iter", *_args(story_file, one)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    two = tmp_path / "two"
    res = _launch_two(_args(story_file, two), env)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((two / "manifest.json").read_text())
    assert m["status"] == "complete" and m["sessions"][0]["processes"] == 2
    for r in range(1, R + 1):
        st = m["rounds"][str(r)]
        assert st["processes"] == 2 and st["encoder_images_per_process"] == [N, N]
    assert _digests(two) == _digests(one)


def _make_flux_lora(path, seed):
    """A small random LoRA (q/k/v/out of every attention) for the tiny FLUX transformer,
    saved the diffusers way, like the GSA training stages write theirs."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    from pipelines.tiny import get_tiny_flux

    torch.manual_seed(seed)
    tr = FluxTransformer2DModel.from_pretrained(get_tiny_flux(), subfolder="transformer")
    tr.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                              target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    FluxPipeline.save_lora_weights(str(path.parent), transformer_lora_layers=
                                   get_peft_model_state_dict(tr), weight_name=path.name)
    return path


# two adapters stacked on one model is the point here (GSA stage 1 + stage 2)
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_flux_with_two_lora_files(story_file, tmp_path):
    l1 = _make_flux_lora(tmp_path / "loras" / "stage1.safetensors", 1)
    l2 = _make_flux_lora(tmp_path / "loras" / "stage2.safetensors", 2)
    base = ["--story", str(story_file), "--backbone", "flux", "--frames", "2", "--rounds", "1",
            "--steps", "1", "--height", "64", "--width", "64", "--batch-size", "2",
            "--no-step-progress", "--refs", "window:1"]
    plain, lora = tmp_path / "plain", tmp_path / "lora"
    assert main(base + ["--out", str(plain)]) == 0
    assert main(base + ["--out", str(lora), "--lora", str(l1), str(l2)]) == 0
    m = json.loads((lora / "manifest.json").read_text())
    assert m["config"]["loras"] == [str(l1.resolve()), str(l2.resolve())]
    assert len(_digests(lora)) == 4
    assert _digests(lora) != _digests(plain)  # the adapters are active


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_sdxl_two_lora_files_are_both_active(tmp_path):
    """load_lora_weights activates only the adapter it just loaded; the SDXL backbone's
    loader must leave every --lora on (as FLUX's does), and the output must change with the
    first file too, not only the last."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    from pipelines.lora_files import load_lora_files
    from pipelines.tiny import get_tiny_sdxl

    model = get_tiny_sdxl()
    files = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
        unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        StableDiffusionXLPipeline.save_lora_weights(
            str(tmp_path), unet_lora_layers=get_peft_model_state_dict(unet),
            weight_name=f"l{seed}.safetensors")
        files.append(str(tmp_path / f"l{seed}.safetensors"))

    def unet_out(loras):
        pipe = StableDiffusionXLPipeline.from_pretrained(model)
        names = load_lora_files(pipe, loras, "sdxl")
        assert sorted(pipe.get_active_adapters()) == names
        u = pipe.unet
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, u.config.in_channels, 8, 8, generator=g)
        ehs = torch.randn(1, 4, u.config.cross_attention_dim, generator=g)
        cond = {"text_embeds": torch.randn(1, pipe.text_encoder_2.config.projection_dim,
                                           generator=g), "time_ids": torch.zeros(1, 6)}
        with torch.no_grad():
            return u(x, 10, ehs, added_cond_kwargs=cond).sample

    both, second = unet_out(files), unet_out(files[1:])
    assert not torch.allclose(both, second)      # the first file counts too


def test_character_reference_images_join_the_pool(tmp_path):
    from PIL import Image

    Image.new("RGB", (48, 48), (250, 250, 250)).save(tmp_path / "snowman.png")
    story = json.loads(json.dumps(STORY))
    story["characters"][0]["reference_images"] = ["snowman.png"]
    f = tmp_path / "story.json"
    f.write_text(json.dumps(story))
    out = tmp_path / "run"
    args = ["--story", str(f), "--rounds", "1", "--steps", "1", "--height", "64", "--width", "64",
            "--batch-size", "2", "--no-step-progress", "--refs", "topk:2", "--out", str(out)]
    assert main(args) == 0
    m = json.loads((out / "manifest.json").read_text())
    # N frames of round 0 + 1 character image, each through the encoder once
    assert m["rounds"]["1"]["encoder_images"] == N + 1
    assert m["rounds"]["1"]["num_refs"] == N + 1
    assert len(_digests(out)) == 2 * N


def test_flux_batch_scope_cache_equals_round_scope():
    """When a round's references do not fit the cache budget, the cache holds one batch's
    union at a time (re-recorded per batch); references keep their rotary place, so the
    frames match the round-scope ones."""
    import numpy as np
    import torch
    from PIL import Image

    from pipelines.backbones.flux import FluxBackbone
    from pipelines.tiny import get_tiny_flux

    rng = np.random.default_rng(0)
    refs = [Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")) for _ in range(4)]
    prompts = ["a snowman", "a fox", "a fox and a snowman", "snow"]
    sel = [[0, 1], [1, 2], [2, 3], [0, 3]]
    outs = {}
    for budget in (None, 1):
        bb = FluxBackbone(get_tiny_flux(), height=64, width=64, steps=2, step_progress=False,
                          cache_budget_bytes=budget, record_batch=2)
        bb.load()
        info = bb.begin_round(refs, 0.0, ref_prompts=prompts)
        assert info["cache_scope"] == ("round" if budget is None else "batch")
        imgs = []
        for s in (0, 2):
            gens = [torch.Generator().manual_seed(0) for _ in range(2)]
            imgs += bb.draw(prompts[s:s + 2], gens, sel[s:s + 2])
        if budget is not None:
            # batch unions {0,1,2} and {0,2,3}: 6 VAE encodes instead of 4, less cache
            assert bb.encoder_images == 6 and len(bb.cache) == 3
        else:
            assert bb.encoder_images == 4 and len(bb.cache) == 4
        bb.end_round()
        outs[budget] = [np.asarray(im, dtype=np.int16) for im in imgs]
    diff = max(int(np.abs(a - b).max()) for a, b in zip(outs[None], outs[1]))
    assert diff <= 2, diff


def test_resume_after_sigkill(sdxl_run, story_file, tmp_path):
    """Kill the process for real (SIGKILL, wherever it is), rerun the same command: the
    result equals the uninterrupted run and no partial file is ever left behind."""
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipelines.story_iter", *_args(story_file, out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while len(list(out.glob("round_*/frame_*.png"))) < 6 and proc.poll() is None:
            assert time.time() < deadline, "the run made no progress"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = _digests(out)
    assert 0 < len(killed_at) < N * (R + 1) or proc.returncode == 0
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert _digests(out) == _digests(sdxl_run)
    assert not list(out.rglob("*.tmp"))
