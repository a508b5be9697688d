"""Bad inputs to ``python -m pipelines.train`` stop before any training step, with a
message that names the problem (and the path)."""
import json
import os
from pathlib import Path

import pytest
import torch

from pipelines.train import cli as T
from pipelines.train import data as D
from pipelines.cli_common import UsageError
from pipelines.lora_files import check_lora_fits
from pipelines.train import model as M
from pipelines.tiny import get_tiny_flux, tiny_flux_transformer_config
from pipelines.train.synthetic import make_dpo_pairs, make_story_groups


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return get_tiny_flux(os.environ.get("STORYATTN_TINY_DIR") or tmp_path_factory.mktemp("tiny"))


def run_main(argv, capsys):
    rc = T.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def assert_stopped(rc, text, out_dir, *needles):
    assert rc == 2, text
    assert "error:" in text
    for n in needles:
        assert n in text, (n, text)
    assert not (Path(out_dir) / "metrics.jsonl").exists()
    assert not (Path(out_dir) / "pytorch_lora_weights.safetensors").exists()


def _png(path, size=16, colour=(200, 30, 30)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def _metadata(root, rows):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_missing_data_folder(tiny_flux, tmp_path, capsys):
    out = tmp_path / "out"
    rc, text = run_main(["--stage", "gsa", "--model", tiny_flux, "--data", str(tmp_path / "nope"),
                         "--output-dir", str(out)], capsys)
    assert_stopped(rc, text, out, "does not exist", str(tmp_path / "nope"))


def test_missing_model_folder(tmp_path, capsys):
    out = tmp_path / "out"
    rc, text = run_main(["--stage", "gsa", "--model", str(tmp_path / "no_model"),
                         "--output-dir", str(out)], capsys)
    assert_stopped(rc, text, out, "model folder", "does not exist")


def test_empty_dataset(tiny_flux, tmp_path, capsys):
    data = tmp_path / "data"
    _metadata(data, [])
    out = tmp_path / "out"
    rc, text = run_main(["--stage", "gsa", "--model", tiny_flux, "--data", str(data),
                         "--output-dir", str(out)], capsys)
    assert_stopped(rc, text, out, "no usable story group")


def test_no_metadata(tiny_flux, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    out = tmp_path / "out"
    rc, text = run_main(["--stage", "gsa", "--model", tiny_flux, "--data", str(tmp_path / "data"),
                         "--output-dir", str(out)], capsys)
    assert_stopped(rc, text, out, "no metadata.jsonl")


def test_metadata_names_missing_file(tmp_path):
    data = tmp_path / "data"
    _png(data / "a" / "0.png")
    _metadata(data, [{"file_name": "a/0.png", "text": "x", "group": "a"},
                     {"file_name": "a/1.png", "text": "y", "group": "a"}])
    with pytest.raises(D.DataError, match="do not exist") as ei:
        D.load_story_groups(data)
    assert str((data / "a" / "1.png").resolve()) in str(ei.value)


def test_small_groups_skipped_and_unreadable_reported(tmp_path, capsys):
    data = tmp_path / "data"
    for i in range(3):
        _png(data / "big" / f"{i}.png")
    _png(data / "lonely" / "0.png")
    bad = data / "big" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    rows = [{"file_name": f"big/{i}.png", "text": f"a fox {i}"} for i in range(3)]
    rows += [{"file_name": "big/broken.png", "text": "b"}, {"file_name": "lonely/0.png", "text": "c"}]
    _metadata(data, rows)
    ds = D.load_story_groups(data)
    out = capsys.readouterr().out
    assert ds.group_names == ["big"] and len(ds) == 3      # group defaults to the folder
    assert str(bad.resolve()) in ds.skipped
    assert "unreadable image skipped" in out and str(bad.resolve()) in out
    assert "'lonely' has 1 usable image" in out


def test_only_small_groups_is_an_error(tiny_flux, tmp_path, capsys):
    data = tmp_path / "data"
    _png(data / "a" / "0.png")
    _png(data / "b" / "0.png")
    _metadata(data, [{"file_name": "a/0.png", "text": "x"}, {"file_name": "b/0.png", "text": "y"}])
    out = tmp_path / "out"
    rc, text = run_main(["--stage", "gsa", "--model", tiny_flux, "--data", str(data),
                         "--output-dir", str(out)], capsys)
    assert_stopped(rc, text, out, "no usable story group", "fewer than 2")


def test_pairs_naming_missing_files(tiny_flux, tmp_path, capsys):
    pairs = make_dpo_pairs(tmp_path / "pairs", size=64)
    lines = pairs.read_text().splitlines()
    first = json.loads(lines[0])
    first["loser"] = "fox/does_not_exist.png"
    pairs.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    out = tmp_path / "out"
    rc, text = run_main(["--stage", "dpo", "--model", tiny_flux, "--data", str(pairs),
                         "--stage1-lora", str(tmp_path / "unused"), "--output-dir", str(out)], capsys)
    assert_stopped(rc, text, out, "does_not_exist.png", "file does not exist")


def test_pairs_format_errors(tmp_path):
    p = tmp_path / "pairs.jsonl"
    _png(tmp_path / "r.png")
    p.write_text(json.dumps({"prompt": "x", "references": ["r.png"], "winner": "r.png"}) + "\n")
    with pytest.raises(D.DataError, match="both 'winner' and 'loser'"):
        D.load_preference_pairs(p)
    p.write_text(json.dumps({"prompt": "x", "references": [], "winner": "r.png",
                             "loser": "r.png"}) + "\n")
    with pytest.raises(D.DataError, match="references"):
        D.load_preference_pairs(p)
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match="no pairs.jsonl"):
        D.load_preference_pairs(tmp_path / "empty")


def test_pools_expand_to_pairs(tmp_path):
    pairs = make_dpo_pairs(tmp_path / "pairs", size=64)
    ds = D.load_preference_pairs(pairs.parent)
    # character 0: 2 single pairs; characters 1, 2: pools of 2 winners x 2 losers
    assert len(ds) == 2 + 4 + 4
    assert all(len(r) == 2 for r in ds.references)


def _foreign_lora(tmp_path) -> Path:
    """A LoRA trained for a FLUX with another width (head dim 8 instead of 16)."""
    from diffusers import FluxTransformer2DModel

    cfg = dict(tiny_flux_transformer_config(), attention_head_dim=8, axes_dims_rope=(2, 2, 4))
    other = FluxTransformer2DModel(**cfg)
    M.add_trainable_lora(other, "gsa", 4)
    with torch.no_grad():
        for n, p in M.adapter_params(other, "gsa").items():
            p.normal_()
    out = tmp_path / "foreign"
    M.save_lora(other, "gsa", out)
    return out


def test_stage1_lora_for_another_model(tiny_flux, tmp_path, capsys):
    lora = _foreign_lora(tmp_path)
    out = tmp_path / "out"
    rc, text = run_main(["--stage", "dpo", "--model", tiny_flux, "--data", "synthetic",
                         "--stage1-lora", str(lora),
                         "--output-dir", str(out)], capsys)
    assert_stopped(rc, text, out, "does not fit this model", "lora_A: shape")


def test_stage1_lora_with_unknown_layers(tiny_flux, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from diffusers import FluxTransformer2DModel

    tr = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    M.add_trainable_lora(tr, "gsa", 4)
    good = tmp_path / "good"
    M.save_lora(tr, "gsa", good)
    sd = load_file(str(good / M.LORA_WEIGHT_NAME))
    sd = {k.replace("transformer_blocks.1.", "transformer_blocks.7."): v for k, v in sd.items()}
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(sd, str(bad / M.LORA_WEIGHT_NAME))
    with pytest.raises(UsageError, match="transformer_blocks.7"):
        check_lora_fits(tr, bad)
    assert check_lora_fits(tr, good)[1] == 34


def test_stage1_lora_missing(tiny_flux, tmp_path, capsys):
    out = tmp_path / "out"
    rc, text = run_main(["--stage", "dpo", "--model", tiny_flux, "--data", "synthetic",
                         "--stage1-lora", str(tmp_path / "nothing"), "--output-dir", str(out)], capsys)
    assert_stopped(rc, text, out, "stage-1 LoRA", "does not exist")


def test_dpo_with_model_needs_stage1(tiny_flux, tmp_path, capsys):
    rc, text = run_main(["--stage", "dpo", "--model", tiny_flux, "--data", "synthetic",
                         "--output-dir", str(tmp_path / "o")], capsys)
    assert_stopped(rc, text, tmp_path / "o", "needs --stage1-lora")


def test_bad_resume_path_and_ranges(tiny_flux, tmp_path, capsys):
    rc, text = run_main(["--stage", "gsa", "--model", tiny_flux, "--data", "synthetic",
                         "--resume", str(tmp_path / "x"), "--output-dir", str(tmp_path / "o")],
                        capsys)
    assert_stopped(rc, text, tmp_path / "o", "not a checkpoint folder")
    rc, text = run_main(["--stage", "gsa", "--num-refs", "0", "--output-dir",
                         str(tmp_path / "o")], capsys)
    assert_stopped(rc, text, tmp_path / "o", "--num-refs must be >= 1")


def test_step_sampler_is_a_function_of_step_and_rank():
    s = D.StepSampler(n_items=7, batch_size=2, world_size=2, seed=5)
    a = [s.indices(step, r) for step in range(7) for r in range(2)]
    s2 = D.StepSampler(n_items=7, batch_size=2, world_size=2, seed=5)
    backwards = {(step, r): s2.indices(step, r) for step in reversed(range(7)) for r in (1, 0)}
    assert a == [backwards[(step, r)] for step in range(7) for r in range(2)]
    flat = [i for x in a for i in x]
    # each epoch (7 slots) visits every item once
    assert sorted(flat[:7]) == list(range(7)) and sorted(flat[7:14]) == list(range(7))


def test_synthetic_groups_are_deterministic(tmp_path):
    a = make_story_groups(tmp_path / "a", size=32, seed=1)
    b = make_story_groups(tmp_path / "b", size=32, seed=1)
    fa = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert fa == sorted(p.relative_to(b) for p in b.rglob("*.png")) and len(fa) == 12
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in fa)
