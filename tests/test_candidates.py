"""``python -m pipelines.candidates`` on the tiny offline FLUX: scenario checks (one-line
errors), seeds recorded, GSA really reads each scenario's references, resume redraws
only what is missing (bit-identical), a changed command is refused."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from pipelines.candidates.cli import MANIFEST, candidate_seed, main
from pipelines.tiny import get_tiny_flux


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return get_tiny_flux(os.environ.get("STORYATTN_TINY_DIR") or tmp_path_factory.mktemp("tiny"))


def write_scenarios(folder, scenarios):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rgb in (("red", (220, 40, 30)), ("blue", (20, 60, 230)), ("grey", (128, 128, 128))):
        Image.new("RGB", (64, 64), rgb).save(folder / f"{name}.png")
    p = folder / "scenarios.json"
    p.write_text(json.dumps({"scenarios": scenarios}))
    return p


@pytest.mark.parametrize("scen, msg", [
    ([{"prompt": "a fox", "references": ["missing.png"]}], "file does not exist"),
    ([{"prompt": "a fox", "references": []}], "'references' must be a non-empty list"),
    ([{"prompt": "", "references": ["red.png"]}], "'prompt' must be a non-empty string"),
    ([{"id": "../x", "prompt": "a", "references": ["red.png"]}], "it names a folder"),
    ([{"id": "a", "prompt": "a", "references": ["red.png"]},
      {"id": "a", "prompt": "b", "references": ["red.png"]}], "used twice"),
    ([{"prompt": "a", "references": ["red.png"], "characters": ["x", "y"]}], "one name per reference"),
    ([{"prompt": "a", "refs": ["red.png"], "references": ["red.png"]}], "unknown key"),
    ([{"prompt": "a", "references": ["red.png"], "reference_prompts": ["x", "y"]}],
     "one per reference"),
    ([], "at least one scenario"),
    ([{"prompt": "a", "references": ["red.png"], "regions": [[0, 0, 0.5, 1], None]}],
     "'regions' must be a list of 1 entries"),
    ([{"prompt": "a", "references": ["red.png"], "regions": [[0.6, 0, 0.5, 1]]}],
     "'regions' must be a list of 1 entries"),
])
def test_bad_scenarios_one_line(tmp_path, capsys, scen, msg):
    p = write_scenarios(tmp_path, scen)
    assert main(["--scenarios", str(p), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1 and "Traceback" not in err


def test_docs_scenarios_example_loads(tmp_path):
    """The scenarios file shown in docs/candidates.md is what load_scenarios reads."""
    import re
    from pathlib import Path

    from pipelines.candidates.scenarios import load_scenarios

    page = (Path(__file__).resolve().parents[1] / "docs" / "candidates.md").read_text()
    body = re.search(r"## Scenarios file\s*```json\n(.*?)\n```", page, re.S).group(1)
    (tmp_path / "s.json").write_text(body)
    for name in ("snowman", "fox"):
        (tmp_path / "refs").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "refs" / f"{name}.png")
    got = load_scenarios(tmp_path / "s.json")
    assert [s.id for s in got] == ["meet", "s001"]
    assert got[0].characters == ["snowman", "fox"] and got[1].references == [tmp_path / "refs/fox.png"]
    assert got[0].regions == [[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]] and got[1].regions == []


def test_draw_resume_and_refuse(tiny_flux, tmp_path, capsys, monkeypatch):
    from storyattn import GroupSharedAttention

    scen = [{"id": "two", "prompt": "a fox in the snow", "references": ["red.png", "blue.png"],
             "characters": ["fox", "snowman"]},
            {"id": "one", "prompt": "a fox in the snow", "references": ["grey.png"]}]
    p = write_scenarios(tmp_path / "in", scen)
    out = tmp_path / "set"
    argv = ["--scenarios", str(p), "--out", str(out), "-k", "2", "--model", tiny_flux,
            "--steps", "1", "--height", "64", "--width", "64", "--batch-size", "2", "--seed", "5",
            "--no-step-progress"]
    replays = []
    real_replay = GroupSharedAttention.replay

    def spy(self, cache, ref_index=None, **kw):   # what each candidate batch reads
        replays.append((len(cache), ref_index))
        return real_replay(self, cache, ref_index, **kw)

    monkeypatch.setattr(GroupSharedAttention, "replay", spy)
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "plan: 2 scenario(s) x 2 candidate(s) = 4 images" in text and "4 to draw" in text
    assert "scenario one: 2 candidates; 4/4 drawn, ETA 0m00s" in text
    # one cache per scenario holding exactly its references, read whole by the batch
    assert replays == [(2, None), (1, None)]
    m = json.loads((out / MANIFEST).read_text())
    assert m["status"] == "complete" and m["config"]["seed"] == 5
    seeds = [c["seed"] for s in m["scenarios"] for c in s["candidates"]]
    assert seeds == [candidate_seed(5, s, k) for s in ("two", "one") for k in range(2)]
    assert len(set(seeds)) == 4
    assert np.asarray(Image.open(out / "two/ref_01.png")).reshape(-1, 3)[0].tolist() == [20, 60, 230]
    assert m["scenarios"][0]["characters"] == ["fox", "snowman"]
    first = (out / "two/cand_01.png").read_bytes()
    (out / "two/cand_01.png").unlink()
    mtime = (out / "two/cand_00.png").stat().st_mtime_ns
    assert main(argv) == 0
    assert "3 already done, 1 to draw" in capsys.readouterr().out
    assert (out / "two/cand_01.png").read_bytes() == first                 # seeded: identical
    assert (out / "two/cand_00.png").stat().st_mtime_ns == mtime           # not rewritten
    assert replays[2:] == [(2, None)]                                      # 'one' not redrawn
    assert main(argv[:-1] + ["--seed", "6", "--no-step-progress"]) == 2
    assert "made with other settings" in capsys.readouterr().err


def test_regions_reach_the_draw(tiny_flux, tmp_path, monkeypatch):
    """A scenario with ``regions``: every candidate batch (a short last one too) reads each
    reference only inside its box, and the set's manifest keeps the boxes for the export."""
    from storyattn import GroupSharedAttention

    left, right = [0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]
    scen = [{"id": "duo", "prompt": "a fox and a snowman", "references": ["red.png", "blue.png"],
             "regions": [left, right]}]
    p = write_scenarios(tmp_path / "in", scen)
    seen = []
    real_replay = GroupSharedAttention.replay

    def spy(self, cache, ref_index=None, **kw):
        seen.append((ref_index, kw.get("ref_regions")))
        return real_replay(self, cache, ref_index, **kw)

    monkeypatch.setattr(GroupSharedAttention, "replay", spy)
    assert main(["--scenarios", str(p), "--out", str(tmp_path / "set"), "-k", "3",
                 "--model", tiny_flux, "--steps", "1", "--batch-size", "2",
                 "--no-step-progress"]) == 0
    assert [tuple(idx.shape) for idx, _ in seen] == [(2, 2), (1, 2)]
    for idx, masks in seen:
        assert idx.tolist() == [[0, 1]] * len(idx)
        side = int(masks.shape[-1] ** 0.5)                   # the token grid is square
        h = side // 2
        grid = masks.view(len(idx), 2, side, side)
        assert grid[:, 0, :, :h].all() and not grid[:, 0, :, h:].any()
        assert grid[:, 1, :, h:].all() and not grid[:, 1, :, :h].any()
    m = json.loads((tmp_path / "set" / MANIFEST).read_text())
    assert m["scenarios"][0]["regions"] == [left, right]
