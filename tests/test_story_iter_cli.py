"""What a user sees from ``python -m pipelines.story_iter`` (and ``pipelines.train``'s
arguments): the plan before loading, one-line errors with exit code 2 and no half-made
folder, the output-folder lock, Ctrl-C, and a clean run's output.  Tiny presets at
32-64 px, 1 step."""
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from pipelines.story_iter import main  # noqa: E402
from pipelines.story_iter.run import PAUSE_ENV  # noqa: E402
from pipelines.tiny import get_tiny_flux, get_tiny_sdxl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROG = "python -m pipelines.story_iter"
# the tiny random SDXL preset (without --backbone, no --model and no --story draw the world)
SMALL = ["--backbone", "sdxl", "--frames", "2", "--rounds", "1", "--steps", "1", "--height", "32",
         "--width", "32", "--batch-size", "1"]


def _env():
    # the warning filters a user has (PYTHONWARNINGS unset): what a clean run must not print
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PYTHONWARNINGS", None)
    return env


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "pipelines.story_iter", *args], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300, **kw)


def _save(path, tensors):
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(*s) for k, s in tensors.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import torch

    d = tmp_path_factory.mktemp("inputs")
    torch.save({"w": torch.zeros(3)}, d / "pickled.safetensors")   # a .pt under another name
    return {
        "pickled": str(d / "pickled.safetensors"),
        "nolora": _save(d / "nolora.safetensors", {"unet.conv.weight": (2, 2)}),
        "flux_lora": _save(d / "flux_lora.safetensors",
                           {"transformer.x.to_q.lora_A.weight": (4, 8),
                            "transformer.x.to_q.lora_B.weight": (8, 4)}),
        "stray_lora": _save(d / "stray_lora.safetensors",
                            {"somewhere.layer.lora_A.weight": (4, 8),
                             "somewhere.layer.lora_B.weight": (8, 4)}),
    }


def _one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, err)


@pytest.mark.parametrize("argv, needles", [
    (["--lora", "{pickled}"], ["--lora", "not a safetensors file"]),
    (["--lora", "{nolora}"], ["--lora", "no LoRA weights"]),
    (["--lora", "{flux_lora}"], ["--lora", "FLUX LoRA", "--backbone flux"]),
    (["--refs", "foo"], ["--refs 'foo'", "topk:K"]),
    (["--refs", "topk:0"], ["--refs 'topk:0'", "K, W >= 1"]),
    (["--device", "cuda"], ["--device cuda", "--device cpu"]),
    (["--height", "63"], ["--height 63", "multiple of 8", "--height 56"]),
    (["--backbone", "flux", "--model", "{sdxl}"], ["--model", "StableDiffusionXLPipeline",
                                                   "--backbone sdxl"]),
    (["--frames", "0"], ["--frames 0"]),
    (["--bogus"], ["unrecognized arguments: --bogus"]),
])
def test_user_mistakes_are_one_line_before_loading(argv, needles, files, tmp_path, capsys):
    import torch

    if "--device" in argv and torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    out = tmp_path / "run"
    argv = [a.format(sdxl=get_tiny_sdxl(), **files) for a in argv] + ["--out", str(out)]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own exit
        rc = e.code
    cap = capsys.readouterr()
    _one_line_error(rc, cap.err, *needles)
    assert "plan:" not in cap.out   # refused before the plan, so before any loading
    assert not out.exists()


def test_lora_that_matches_no_layer_is_refused_after_loading(files, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["--lora", files["stray_lora"], *SMALL, "--out", str(out)])
    cap = capsys.readouterr()
    _one_line_error(rc, cap.err, "--lora", "none of its weights match a layer")
    assert not out.exists()   # the failed start left no folder behind


def test_subprocess_error_has_no_traceback(files, tmp_path):
    res = _run(["--lora", files["pickled"], "--out", str(tmp_path / "o")])
    _one_line_error(res.returncode, res.stderr, "not a safetensors file")
    assert res.stdout == ""


def test_small_model_by_path_gets_its_own_size():
    from pipelines.story_iter.cli import build_parser
    from pipelines.story_iter.dist import Dist
    from pipelines.story_iter.plan import format_plan, plan_rows, resolve

    for backbone, model in (("flux", get_tiny_flux()), ("sdxl", get_tiny_sdxl())):
        extra = ["--ip-adapter", str(Path(model) / "ip_adapter" / "ip-adapter_tiny.safetensors")] \
            if backbone == "sdxl" else []
        plan = resolve(build_parser().parse_args(["--backbone", backbone, "--model", model,
                                                  *extra]), Dist())
        cfg = plan["config"]
        assert (cfg["height"], cfg["width"], cfg["steps"], cfg["rounds"]) == (64, 64, 3, 2)
        text = format_plan(plan_rows(plan))
        assert "64x64 (model built for 64x64)" in text and "resume" in text
    # explicit values win
    plan = resolve(build_parser().parse_args(["--backbone", "flux", "--model", get_tiny_flux(),
                                              "--steps", "7", "--height", "48"]), Dist())
    assert (plan["config"]["steps"], plan["config"]["height"], plan["config"]["width"]) == \
        (7, 48, 64)


def test_lock_refuses_a_live_run_and_takes_over_a_stale_one(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                               "started": "earlier"}))
        rc = main([*SMALL, "--out", str(out)])
        cap = capsys.readouterr()
        assert rc == 3
        assert f"pid {holder.pid}" in cap.err and "another run" in cap.err
        assert not (out / "manifest.json").exists()
        assert json.loads((out / ".lock").read_text())["pid"] == holder.pid   # untouched
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now: its lock is stale
    rc = main([*SMALL, "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert f"taking over the lock of {out}: its holder (pid {holder.pid}) is no longer " \
           "running" in cap.out
    assert not (out / ".lock").exists()   # released at the end
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def _check_plan(lines, resume):
    """The plan is printed whole, before the line that says the weights loaded."""
    i_plan = lines.index("plan:")
    i_loaded = next(i for i, ln in enumerate(lines) if ln.startswith("loaded sdxl"))
    assert i_plan < i_loaded
    plan = "\n".join(lines[i_plan:i_loaded])
    for label in ("backbone", "model", "resolution", "steps", "rounds", "batch", "references",
                  "dtype", "device", "output", "resume"):
        assert f"\n  {label} " in plan, label
    assert "32x32 (model built for 64x64)" in plan and re.search(r"\n  steps +1\n", plan)
    assert re.search(r"\n  resume +" + re.escape(resume), plan), plan


def test_ctrl_c_then_a_clean_resumed_run(tmp_path):
    """Run 1 is interrupted with SIGINT after its first frame: one line, exit 130, manifest
    "interrupted".  Run 2 (the same command) says what it resumes and finishes; its
    output is the plan, progress lines and the result, with nothing at all on stderr
    (no library warnings or notices, no bars: stderr is not a terminal)."""
    out = tmp_path / "run"
    args = [*SMALL, "--out", str(out)]
    # the run waits after its first frame (test hook), so the interrupt lands mid-run: a
    # 32x32 one-step frame takes milliseconds and the run used to finish before the signal
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.story_iter", *args], cwd=ROOT,
                            env={**_env(), PAUSE_ENV: "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # a shell's background job starts with SIGINT ignored, and the
                            # child would inherit that: give it the default a user's run has
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not list(out.glob("round_00/frame_*.png")) and proc.poll() is None:
        assert time.time() < deadline, "no frame was written"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    done = len(list(out.glob("round_*/frame_*.png")))
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == [
        f"interrupted after {done} frames ({done} of 4 done); rerun the same command to resume"]
    _check_plan(stdout.splitlines(), "no (new run)")
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "interrupted" and m["sessions"][-1]["frames_written"] == done
    assert not (out / ".lock").exists()

    res = _run(args)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    lines = res.stdout.splitlines()
    _check_plan(lines, f"yes: {done} of 4 frames done, next round")
    assert sum("prompts are longer than" in ln for ln in lines) == 1   # said once
    progress = [ln for ln in lines if ln.startswith("round ")]
    assert progress[-1].startswith(f"round 1/1: {4 - done}/{4 - done} frames")
    assert "ETA" in progress[-1]
    assert lines[-1].startswith("done: 2 frames x 2 rounds")
    allowed = ("plan:", "  ", "preflight:", "loaded ", "note: ", "round ", "done: ",
               "no --model: the built-in demo")
    assert all(ln.startswith(allowed) for ln in lines), lines
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["sessions"][-1]["resumed"]
    assert len(list(out.glob("round_*/frame_*.png"))) == 4


# -- pipelines.train's arguments ---------------------------------------------------------


def test_train_help_shows_each_default_once():
    from pipelines.train.cli import build_parser

    text = build_parser().format_help()
    assert text.count("(default") >= 5
    for block in text.split("\n  --")[1:]:
        assert block.count("default") <= 1, block


@pytest.mark.parametrize("argv, needles", [
    (["--stage", "gsa", "--resolution", "63"], ["--resolution 63", "multiple of 8"]),
    (["--stage", "gsa", "--model", "{sdxl}"], ["--model", "StableDiffusionXLPipeline"]),
    (["--stage", "dpo", "--model", "tiny", "--stage1-lora", "{pickled}"],
     ["--stage1-lora", "not a safetensors"]),
    (["--stage", "dpo", "--model", "tiny", "--stage1-lora", "{nolora}"],
     ["--stage1-lora", "no LoRA weights"]),
])
def test_train_mistakes_stop_before_loading_and_leave_no_folder(argv, needles, files, tmp_path,
                                                                capsys):
    from pipelines.train.cli import main as train_main

    out = tmp_path / "train"
    rc = train_main([a.format(sdxl=get_tiny_sdxl(), **files) for a in argv]
                    + ["--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)
    assert not out.exists()
