"""``python -m pipelines.train`` without ``--model``/``--data``: the committed story-world FLUX,
the world recipe's defaults, world story groups (gsa) and the committed preference pools (dpo);
missing world files and mismatched presets are one-line errors."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.train import cli as T
from pipelines.world.recipe import WORLD_GROUPS, WORLD_PER_GROUP, WORLD_RECIPE, recipe_argv
from pipelines.world import data as WD
from pipelines.world import weights as W

REPO = Path(__file__).resolve().parents[1]

needs_world = pytest.mark.skipif(not W.available(), reason="no committed world weights "
                                 "(python -m pipelines.world_build build)")


def _train(argv, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "pipelines.train", *argv, "--cpu"], cwd=cwd,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def _resolved(argv):
    return T.resolve_args(T.build_parser().parse_args(argv))


def _weights_without(tmp_path, monkeypatch, keep):
    """A weights folder holding only ``keep`` (links to the committed files)."""
    root = tmp_path / "weights"
    root.mkdir()
    for name in keep:
        (root / name).symlink_to(W.WEIGHTS_DIR / name)
    monkeypatch.setattr(W, "WEIGHTS_DIR", root)


@needs_world
def test_default_gsa_run_is_the_world_model_on_world_groups(tmp_path):
    out = tmp_path / "gsa"
    log = _train(["--stage", "gsa", "--max-steps", "2", "--output-dir", str(out)], tmp_path)
    assert f"no --model given: the committed story-world FLUX ({W.flux_path()})" in log
    assert f"no --data given: world story groups ({WORLD_GROUPS} training identities" in log
    assert "batch 8 x 1 process(es), 2 reference(s) per sample, lr 0.003" in log
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["model"] == W.flux_path() and summary["world_model"] is True
    assert Path(summary["data"]) == out / "world_data" and summary["world_data"] is True
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # the data are world frames of the training identities: groups of two characters, two
    # reference images each, frames naming their characters' references and boxes
    meta = [json.loads(l) for l in (out / "world_data" / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == WORLD_GROUPS * (WORLD_PER_GROUP + 4)
    assert len({m["group"] for m in meta}) == WORLD_GROUPS
    from PIL import Image

    import numpy as np

    from pipelines.world.reader import read_image
    from pipelines.world import render as WR

    train, held = WD.split_identities(0)
    held_keys = {(h.colour, h.accessory, h.shape, h.pattern) for h in held}
    frames = [m for m in meta if "ref_" not in m["file_name"]]
    assert {len(m["references"]) for m in frames} == {1, 2}
    for m in frames[:: len(frames) // 8][:8]:
        scene, cast = WD.parse_prompt(m["text"])
        chars = read_image(np.asarray(Image.open(out / "world_data" / m["file_name"]))).characters
        assert len(cast) == len(chars) == len(m["references"]), (m, chars)
        assert m["regions"] == [list(WR.character_box(p, s)) for _, s, p in cast]
        for c in chars:
            assert (c["colour"], c["accessory"], c["shape"], c["pattern"]) not in held_keys


@needs_world
def test_default_dpo_run_uses_the_committed_stage1_and_pools(tmp_path):
    try:
        pools = W.dpo_data_path()
    except FileNotFoundError as exc:
        pytest.skip(f"the committed preference pools are not there yet: {exc}")
    out = tmp_path / "dpo"
    log = _train(["--stage", "dpo", "--max-steps", "2", "--output-dir", str(out)], tmp_path)
    assert f"no --stage1-lora given: the committed world stage-1 LoRA ({W.gsa_lora_path()})" in log
    assert f"no --data given: the committed world preference pools ({pools})" in log
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["model"] == W.flux_path() and summary["data"] == pools
    assert summary["stage1_lora"] == W.gsa_lora_path()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


@needs_world
def test_default_dpo_wiring_with_stand_in_pools(tmp_path, monkeypatch, capsys):
    """Until the committed pools exist: ``--stage dpo`` alone reads the pools
    folder of the weights, here a stand-in with synthetic pairs, on the world model and its
    committed stage-1 LoRA, with the world recipe."""
    from pipelines.train.synthetic import make_dpo_pairs

    try:
        W.dpo_data_path()
        pytest.skip("the committed pools exist: test_default_dpo_run_uses_the_committed_... "
                    "runs on them")
    except FileNotFoundError:
        pass
    _weights_without(tmp_path, monkeypatch, [W.FLUX_DIR, W.GSA_LORA])
    make_dpo_pairs(W.WEIGHTS_DIR / W.DPO_DATA, size=64, seed=0)
    out = tmp_path / "dpo"
    assert T.main(["--stage", "dpo", "--max-steps", "2", "--output-dir", str(out), "--cpu"]) == 0
    log = capsys.readouterr().out
    assert "no --stage1-lora given: the committed world stage-1 LoRA" in log
    assert f"no --data given: the committed world preference pools ({W.dpo_data_path()})" in log
    assert "batch 2 x 1 process(es), 1 reference(s) per sample, lr 0.0001" in log
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["model"] == W.flux_path() and summary["data"] == W.dpo_data_path()
    assert summary["stage1_lora"] == W.gsa_lora_path() and summary["world_data"] is True
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] == pytest.approx(math.log(2))


@needs_world
def test_world_defaults_are_the_recipe_the_build_passes(tmp_path):
    """The defaults without --model equal what ``pipelines.world_build build`` passes as flags
    (both read pipelines/world/recipe.py), and an explicit --model gets the generic
    defaults."""
    for stage in ("gsa", "dpo"):
        extra = ["--stage1-lora", W.gsa_lora_path()] if stage == "dpo" else []
        default = _resolved(["--stage", stage, "--data", str(tmp_path)])
        built = _resolved(["--stage", stage, "--model", W.flux_path(), "--data", str(tmp_path),
                           *extra, *recipe_argv(stage)])
        for key, val in WORLD_RECIPE[stage].items():
            assert getattr(default, key) == getattr(built, key) == val, (stage, key)
        generic = _resolved(["--stage", stage, "--model", W.flux_path(), "--data",
                             str(tmp_path), *extra])
        assert generic.batch_size == 1 and generic.num_refs == 2
        assert generic.cache_latents is False and generic.gradient_checkpointing is True
    assert "WORLD 300 gsa / 60 dpo" in T.build_parser().format_help()


@needs_world
def test_missing_pools_or_weights_are_one_line_errors(tmp_path, monkeypatch, capsys):
    _weights_without(tmp_path, monkeypatch, [W.FLUX_DIR, W.GSA_LORA])
    out = tmp_path / "o"
    assert T.main(["--stage", "dpo", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "no --data given and no preference pools" in err and "--data synthetic" in err
    assert not out.exists()
    monkeypatch.setattr(W, "WEIGHTS_DIR", tmp_path / "empty")
    assert T.main(["--stage", "gsa", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "no --model given and no world weights" in err and "--model tiny" in err


@needs_world
def test_tiny_preset_refuses_the_world_stage1_lora(tmp_path, capsys):
    out = tmp_path / "o"
    assert T.main(["--stage", "dpo", "--model", "tiny", "--stage1-lora", W.gsa_lora_path(),
                   "--output-dir", str(out), "--cpu"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "does not fit this model" in err
    assert not out.exists()
