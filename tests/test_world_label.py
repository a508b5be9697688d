"""The reader labeller on rendered candidates whose right label is known by construction
(no model): the rule, marks through a real uvicorn studio, a rerun that posts nothing, a
wrong truth file refused, losers-only scenarios left out of the export; the export copied
with its images; a build seeded from committed weights."""
import json
from pathlib import Path

import pytest

from pipelines.world import data as D
from pipelines.world import render as R
from pipelines.world.scenarios import load_truth, make_scenarios


def other_accessory(ident):
    acc = next(a for a in R.ACCESSORIES if a != ident.accessory)
    return R.Identity(ident.shape, ident.colour, ident.pattern, acc)


def other_colour(ident):
    col = next(c for c in R.COLOURS if c != ident.colour)
    return R.Identity(ident.shape, col, ident.pattern, ident.accessory)


def rendered_set(tmp_path: Path):
    """Scenarios s000..s002 with four rendered candidates each (labels known), s002 with
    losers only; returns (studio root, truth, expected labels)."""
    from _world_sets import draw_candidates, finish_set, start_set

    scenarios, truth, m, out = start_set(tmp_path / "root", n=3, seed=9)
    want = {}
    for s, e in zip(scenarios, m["scenarios"]):
        t = truth[s.id]
        name, size, pos = t["cast"][0]
        ident = t["identities"][name]
        wrong_slot = next(p for p in R.POSITIONS if p != pos)
        frames = [([R.Placement(ident, pos, size)], "winner"),
                  ([R.Placement(other_accessory(ident), pos, size)], "loser"),
                  ([R.Placement(ident, wrong_slot, size)], None),
                  ([R.Placement(other_colour(ident), pos, size)], None)]
        if s.id == "s002":                     # nothing right: no winner to pair with
            frames = [([], "loser"), ([R.Placement(other_accessory(ident), pos, size)], "loser"),
                      ([R.Placement(ident, wrong_slot, size)], None),
                      ([R.Placement(other_colour(ident), pos, size)], None)]
        want[s.id] = draw_candidates(out, e, s, t["scene"], frames)
    finish_set(out, m)
    return tmp_path / "root", truth, want


def test_labeller_on_rendered_candidates(tmp_path):
    pytest.importorskip("uvicorn")
    from _studio_data import thread_server
    from pipelines.studio.journal import JOURNAL_NAME, Journal
    from pipelines.preference_pools import copy_pairs
    from pipelines.train.data import load_preference_pairs
    from pipelines.world_build.label import LabelError, label_set

    root, truth, want = rendered_set(tmp_path)
    with thread_server(root) as url:
        res = label_set(url, "set", truth=truth)
        again = label_set(url, "set", truth=truth)
        wrong = {sid: {**t, "identities": {n: other_accessory(i) for n, i in t["identities"].items()}}
                 for sid, t in truth.items()}
        with pytest.raises(LabelError, match="truth file says"):
            label_set(url, "set", truth=wrong, export=False)
        with pytest.raises(LabelError, match="no candidate set 'nope'"):
            label_set(url, "nope")
    assert res["labels"] == want
    assert (res["winners"], res["losers"], res["unmarked"]) == (2, 4, 6)
    assert res["posted"] == 6 and again["posted"] == 0 and again["labels"] == want
    assert res["losers_only"] == 1 and res["pools"] == 2
    assert res["export"] == {"path": "set/pairs.jsonl", "scenarios": 2, "pairs": 2,
                             "skipped": ["s002"]}
    assert Journal(root / "set" / JOURNAL_NAME).marks() == {
        sid: {k: v for k, v in w.items() if v} for sid, w in want.items()}

    dst = tmp_path / "copy"
    got = copy_pairs(root / "set/pairs.jsonl", dst)
    assert got["files"] == 1 + 2 * 3                      # pairs.jsonl + ref, winner, loser x 2
    pairs = load_preference_pairs(dst)
    assert [p.relative_to(dst.resolve()).as_posix() for p in pairs.winners] == \
        ["s000/cand_00.png", "s001/cand_00.png"]
    (root / "set/bad.jsonl").write_text(json.dumps(
        {"prompt": "x", "references": ["../../escape.png"], "winners": ["a"], "losers": ["b"]}))
    from pipelines.studio.pairs import ExportError

    with pytest.raises(ExportError, match="not under the file's folder"):
        copy_pairs(root / "set/bad.jsonl", tmp_path / "copy2")


def test_scenarios_are_training_identities_with_own_reference_captions(tmp_path):
    from pipelines.candidates.scenarios import load_scenarios
    from pipelines.world.reader import read_image

    scen = make_scenarios(tmp_path, n=6, seed=3, split_seed=0)
    train, held = D.split_identities(0)
    truth = load_truth(tmp_path)
    for s in load_scenarios(scen):
        (name,) = s.characters
        ident = truth[s.id]["identities"][name]
        assert ident in train and ident not in held
        ch = read_image(s.references[0]).characters
        assert [(c["accessory"], c["colour"], c["shape"], c["pattern"]) for c in ch] == \
            [(ident.accessory, ident.colour, ident.shape, ident.pattern)]
        scene, cast = D.parse_prompt(s.reference_prompts[0])
        assert cast == [(name, "big", "centre")] and scene == read_image(s.references[0]).scene
        assert D.parse_prompt(s.prompt)[1][0][0] == name


def test_build_from_weights_takes_committed_stage1(tmp_path):
    from pipelines.world import weights as W
    from pipelines.world_build.build import seed_from_weights

    if not W.available():
        pytest.skip("no committed world weights")
    state = {"seed": W.build_info()["seed"], "stages": {}}
    got = seed_from_weights(tmp_path, Path(W.WEIGHTS_DIR), state)
    assert "gsa" in got and state["stages"]["gsa"]["from_weights"] == str(W.WEIGHTS_DIR)
    assert (tmp_path / "gsa/pytorch_lora_weights.safetensors").read_bytes() == \
        Path(W.gsa_lora_path()).read_bytes()
    assert (tmp_path / "base/model_index.json").is_file()
    assert state["stages"]["sdxl_base"]["from_weights"] == str(W.WEIGHTS_DIR)
    # a stage this folder ran itself keeps its own record on a later --from-weights resume
    own = {"steps": 7, "final_loss": 0.5}
    state2 = {"seed": state["seed"], "stages": {"sdxl_base": dict(own)}}
    seed_from_weights(tmp_path, Path(W.WEIGHTS_DIR), state2)
    assert state2["stages"]["sdxl_base"] == own
    with pytest.raises(SystemExit, match="pass --seed"):
        seed_from_weights(tmp_path, Path(W.WEIGHTS_DIR), {"seed": 12345, "stages": {}})
