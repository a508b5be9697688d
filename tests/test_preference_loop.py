"""The preference loop end to end on the tiny offline FLUX: a stage-1 LoRA, candidates
drawn with it, labels given through the studio's HTTP API (the calls the page makes) by
a labeller function, export, and ``pipelines.train --stage dpo`` trained on the export.

The labeller stands in for a person with a deterministic pixel rule: per scenario the
candidate whose mean colour is nearest the references' mean colour wins, the farthest
loses.  (When the story world's reader is on main it replaces this rule.)
"""
import io
import json
import math
import os
import urllib.request

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the studio needs fastapi and uvicorn")
pytest.importorskip("uvicorn", reason="the studio needs fastapi and uvicorn")

from _studio_data import thread_server  # noqa: E402
from pipelines.candidates.cli import main as candidates_main  # noqa: E402
from pipelines.tiny import get_tiny_flux  # noqa: E402
from pipelines.train import cli as T  # noqa: E402
from pipelines.train.data import load_preference_pairs  # noqa: E402


def train(argv):
    tr = T.Trainer(T.resolve_args(T.build_parser().parse_args(argv)))
    tr.result = tr.run()
    return tr


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def _post(url, obj=None):
    req = urllib.request.Request(url, data=json.dumps(obj or {}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def mean_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)


def pixel_labeller(base: str) -> dict:
    """Label every set under the server's ROOT through its HTTP API; return the choices."""
    chosen = {}
    for st in json.loads(_get(base + "/api/sets"))["items"]:
        d = json.loads(_get(f"{base}/api/sets/{st['id']}"))
        for s in d["scenarios"]:
            ref = np.mean([mean_rgb(_get(f"{base}/file/{r}")) for r in s["references"]], axis=0)
            dist = [float(np.linalg.norm(mean_rgb(_get(f"{base}/file/{c['file']}")) - ref))
                    for c in s["candidates"]]
            win, lose = int(np.argmin(dist)), int(np.argmax(dist))
            for k, label in ((win, "winner"), (lose, "loser")):
                _post(f"{base}/api/sets/{st['id']}/marks",
                      {"id": f"labeller-{s['id']}-{k}", "tab": "labeller", "scenario": s["id"],
                       "candidate": k, "label": label})
            chosen[s["id"]] = (win, lose)
    return chosen


def test_stage1_to_dpo_through_the_studio(tmp_path):
    tiny = get_tiny_flux(os.environ.get("STORYATTN_TINY_DIR") or tmp_path / "tiny")
    s1 = tmp_path / "stage1"
    train(["--stage", "gsa", "--model", tiny, "--data", "synthetic", "--output-dir", str(s1),
           "--max-steps", "1",
           "--rank", "4", "--checkpoint-every", "0", "--learning-rate", "1e-3"])
    lora = s1 / "pytorch_lora_weights.safetensors"
    assert lora.is_file()

    src = tmp_path / "src"
    src.mkdir()
    for name, rgb in (("warm", (230, 120, 40)), ("cold", (40, 90, 220))):
        Image.new("RGB", (64, 64), rgb).save(src / f"{name}.png")
    (src / "s.json").write_text(json.dumps([
        {"id": "warm", "prompt": "a red fox in the autumn forest", "references": ["warm.png"]},
        {"id": "cold", "prompt": "a snowman by the frozen lake", "references": ["cold.png"]}]))
    root = tmp_path / "root"
    assert candidates_main(["--scenarios", str(src / "s.json"), "--out", str(root / "set"),
                            "-k", "3", "--model", tiny, "--lora", str(lora), "--steps", "2",
                            "--batch-size", "3", "--no-step-progress"]) == 0

    with thread_server(root) as base:
        chosen = pixel_labeller(base)
        sid = json.loads(_get(base + "/api/sets"))["items"][0]["id"]
        res = _post(f"{base}/api/sets/{sid}/export")
    assert res["scenarios"] == 2 and res["pairs"] == 2

    pairs = load_preference_pairs(root / "set/pairs.jsonl")
    # the exported pairs are the labeller's choices, recomputed here from the files on disk
    for scen, w, l in zip(pairs.scenario, pairs.winners, pairs.losers):
        ref = mean_rgb((root / f"set/{scen}/ref_00.png").read_bytes())
        d = [np.linalg.norm(mean_rgb((root / f"set/{scen}/cand_{k:02d}.png").read_bytes()) - ref)
             for k in range(3)]
        assert (w.name, l.name) == (f"cand_{int(np.argmin(d)):02d}.png", f"cand_{int(np.argmax(d)):02d}.png")
        assert chosen[scen] == (int(np.argmin(d)), int(np.argmax(d)))

    out = tmp_path / "dpo"
    train(["--stage", "dpo", "--model", tiny, "--stage1-lora", str(s1), "--data",
           str(root / "set/pairs.jsonl"), "--output-dir", str(out), "--max-steps", "2",
           "--rank", "4", "--checkpoint-every", "0", "--learning-rate", "1e-3"])
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-9)   # DPO LoRA starts at zero
    assert (out / "pytorch_lora_weights.safetensors").is_file()
