"""The preference loop end to end in the story world, on the committed weights: world
scenarios -> ``python -m pipelines.candidates`` (world model + stage-1 LoRA, GSA from each
scenario's reference cache) -> the studio under uvicorn in its own process on a free port ->
the reader labeller over its HTTP API -> export -> the trainer's pairs loader -> one step of
``pipelines.train --stage dpo`` on the export.

The labeller's marks are checked against the reader's verdict on each candidate file,
computed here from the files on disk with the rule written out again (not the labeller's
code), and against the studio's journal.
"""
import json
import math

import pytest

pytest.importorskip("fastapi", reason="the studio needs fastapi and uvicorn")
pytest.importorskip("uvicorn", reason="the studio needs fastapi and uvicorn")

from pipelines.candidates.cli import main as candidates_main  # noqa: E402
from pipelines.world import weights as W  # noqa: E402

pytestmark = pytest.mark.skipif(not W.available(), reason="no committed world weights")

K = 3


def expected_label(path, accessory, colour, slot):
    """The rule of pipelines/world_build/label.py, restated: one character at the prompt's slot
    with the reference's accessory and colour wins; none, several, or another accessory
    loses; anything else stays unmarked."""
    from pipelines.world.reader import read_image

    chars = read_image(path).characters
    if len(chars) != 1 or chars[0]["accessory"] != accessory:
        return "loser"
    ok = chars[0]["position"] == slot and chars[0]["colour"] == colour
    return "winner" if ok else None


def test_world_loop_reader_labels_through_the_studio(tmp_path, monkeypatch):
    from storyattn import GroupSharedAttention

    from pipelines.studio.journal import JOURNAL_NAME, Journal
    from pipelines.world_build.studio_child import studio_process
    from pipelines.train import cli as T
    from pipelines.train.data import load_preference_pairs
    from pipelines.world import data as D
    from pipelines.world_build.label import label_set
    from pipelines.world.scenarios import load_truth, make_scenarios

    # seed 7: with the committed weights one of its scenarios draws both a winner and a
    # loser (stage 1 is right most of the time, so most seeds give winners only)
    scen = make_scenarios(tmp_path / "scen", n=3, seed=7)
    truth = load_truth(tmp_path / "scen")
    recorded, replays = [], []
    real_record, real_replay = GroupSharedAttention.record_images, GroupSharedAttention.replay

    def spy_record(self, pipe, images, prompts, **kw):
        recorded.append(list(prompts))
        return real_record(self, pipe, images, prompts, **kw)

    def spy_replay(self, cache, ref_index=None, **kw):
        replays.append(len(cache))
        return real_replay(self, cache, ref_index, **kw)

    monkeypatch.setattr(GroupSharedAttention, "record_images", spy_record)
    monkeypatch.setattr(GroupSharedAttention, "replay", spy_replay)
    root = tmp_path / "root"
    # no --model: the world model with its committed stage-1 LoRA, 64x64
    assert candidates_main(["--scenarios", str(scen), "--out", str(root / "set"), "-k", str(K),
                            "--steps", "4", "--batch-size", str(K), "--no-step-progress"]) == 0
    m = json.loads((root / "set/candidates.json").read_text())
    assert m["config"]["loras"] == [W.gsa_lora_path()] and m["config"]["height"] == 64
    # per scenario one cache holding its one reference, recorded with its own caption, and
    # every candidate drawn reading it
    spec = json.loads(scen.read_text())["scenarios"]
    assert recorded == [s["reference_prompts"] for s in spec]
    assert replays == [1, 1, 1]

    with studio_process(root) as url:
        res = label_set(url, "set", truth=truth)
    marks = Journal(root / "set" / JOURNAL_NAME).marks()
    want = {}
    for s in spec:
        ident = truth[s["id"]]["identities"][s["characters"][0]]
        slot = D.parse_prompt(s["prompt"])[1][0][2]
        want[s["id"]] = {k: expected_label(root / f"set/{s['id']}/cand_{k:02d}.png",
                                           ident.accessory, ident.colour, slot) for k in range(K)}
    assert res["labels"] == want
    assert marks == {sid: {k: v for k, v in w.items() if v} for sid, w in want.items()
                     if any(w.values())}
    pools = [sid for sid, w in want.items() if {"winner", "loser"} <= set(w.values())]
    assert res["pools"] == len(pools) and res["export"]["scenarios"] == len(pools)
    assert res["winners"] + res["losers"] + res["unmarked"] == 3 * K
    if not pools:
        pytest.skip("no scenario got both a winner and a loser with these weights: nothing to "
                    "train on (the labels above were still checked)")

    pairs = load_preference_pairs(root / "set/pairs.jsonl")
    assert sorted(set(pairs.scenario)) == sorted(pools)
    for sid, w, l in zip(pairs.scenario, pairs.winners, pairs.losers):
        assert want[sid][int(w.stem[-2:])] == "winner" and want[sid][int(l.stem[-2:])] == "loser"

    out = tmp_path / "dpo"
    # the docs' command: no --model, so the world model, its stage-1 LoRA and recipe
    args = T.resolve_args(T.build_parser().parse_args([
        "--stage", "dpo", "--data", str(root / "set/pairs.jsonl"), "--output-dir", str(out),
        "--max-steps", "1", "--batch-size", "1", "--checkpoint-every", "0", "--cpu"]))
    assert args.stage1_lora == W.gsa_lora_path() and args.model == W.flux_path()
    T.Trainer(args).run()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-9)   # DPO LoRA starts at zero
    assert (out / "pytorch_lora_weights.safetensors").is_file()
