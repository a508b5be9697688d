"""The studio's HTTP API (FastAPI TestClient and raw HTTP against uvicorn in a thread):
runs and contact-sheet windows, thumbnails made once, the path gate, marks as journal
events (two tabs, undo, resend, a torn line), export read back by the DPO trainer's loader."""
import builtins
import http.client
import json
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the studio needs fastapi (pip install 'storyattn[studio]')")
pytest.importorskip("uvicorn", reason="the studio needs fastapi and uvicorn")
from fastapi.testclient import TestClient  # noqa: E402

from _studio_data import make_run, make_set, thread_server  # noqa: E402
from pipelines.studio.app import create_app  # noqa: E402
from pipelines.studio.files import NotUnderRoot, Root  # noqa: E402
from pipelines.studio.journal import JOURNAL_NAME, Journal, fold  # noqa: E402
from pipelines.train.data import load_preference_pairs  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("studio")
    root = base / "root"
    root.mkdir()
    make_run(root, frames=25, rounds=2)
    secret = base / "outside" / "secret.png"
    secret.parent.mkdir()
    from PIL import Image
    Image.new("RGB", (8, 8)).save(secret)
    (root / "escape.png").symlink_to(secret)          # a file link out of ROOT
    (root / "outdir").symlink_to(secret.parent)       # a folder link out of ROOT
    (root / "inside.png").symlink_to(root / "runs/demo/round_00/frame_000.png")
    return root, secret


@pytest.fixture
def labelled(tmp_path):
    root = tmp_path / "root"
    make_set(root, scenarios=3, k=4)
    return root, TestClient(create_app(root))


def test_runs_list_window_and_frame(world):
    root, _ = world
    c = TestClient(create_app(root))
    runs = c.get("/api/runs").json()
    assert runs["total"] == 1 and runs["items"][0]["frames"] == 25 and runs["items"][0]["rounds"] == 3
    rid = runs["items"][0]["id"]
    d = c.get(f"/api/runs/{rid}", params={"offset": 20, "limit": 20}).json()
    assert d["frame_ids"] == [20, 21, 22, 23, 24]                 # the last window is short
    assert d["grid"][2][1] == "runs/demo/round_02/frame_021.png"
    assert d["prompts"][0] == "prompt of frame 20"
    assert d["figures"]["1"]["scale"] == pytest.approx(0.4) and d["figures"]["2"]["wall_s"] == 4.0
    f = c.get(f"/api/runs/{rid}/frames/7").json()
    assert [r["file"] for r in f["rounds"]] == [f"runs/demo/round_{r:02d}/frame_007.png" for r in range(3)]
    assert f["prompt"] == "prompt of frame 7" and f["seed"] == 107
    assert c.get(f"/runs/{rid}").status_code == 200
    assert c.get(f"/runs/{rid}/frames/3").headers["content-type"].startswith("text/html")
    for bad in ("/api/runs/0123456789ab", "/runs/nope", f"/api/runs/{rid}/frames/25",
                "/sets/0123456789ab", "/api/sets/x/marks"):
        assert c.get(bad).status_code == 404, bad


def test_thumbnail_made_once(world, tmp_path):
    root, _ = world
    c = TestClient(create_app(root, cache_dir=tmp_path / "thumbs"))
    rel = "runs/demo/round_01/frame_004.png"
    a = c.get(f"/thumb/{rel}", params={"size": 96})
    assert a.status_code == 200 and a.headers["content-type"] == "image/jpeg"
    files = list((tmp_path / "thumbs").rglob("*.jpg"))
    assert len(files) == 1
    t0 = files[0].stat().st_mtime_ns
    time.sleep(0.01)
    assert c.get(f"/thumb/{rel}", params={"size": 96}).content == a.content
    assert files[0].stat().st_mtime_ns == t0 and len(list((tmp_path / "thumbs").rglob("*.jpg"))) == 1
    import io
    from PIL import Image
    im = Image.open(io.BytesIO(a.content))
    assert im.size == (64, 64)   # never enlarged
    px = im.convert("RGB").getpixel((32, 32))
    assert all(abs(x - y) <= 3 for x, y in zip(px, (120, 60, 200)))


ESCAPES = ["../secret.png", "a/../../x.png", "/etc/passwd", "", ".", "runs/./demo",
           ".studio/thumbs/x.jpg", "runs\\..\\..\\x.png", "escape.png", "outdir/secret.png",
           "runs/demo//round_00/frame_000.png", "nul\x00.png", "runs/demo/round_00"]


@pytest.mark.parametrize("rel", ESCAPES)
def test_resolve_refuses(world, rel):
    root, _ = world
    with pytest.raises(NotUnderRoot):
        Root(root).resolve(rel)


def test_resolve_accepts_inside(world):
    root, _ = world
    r = Root(root)
    assert r.resolve("inside.png") == (root / "runs/demo/round_00/frame_000.png").resolve()
    assert r.resolve("runs/demo", want_dir=True) == (root / "runs/demo").resolve()


def _raw_get(port, target):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("GET", target, skip_host=False, skip_accept_encoding=True)
    conn.endheaders()
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, body


RAW = ["/file/../../outside/secret.png", "/file/%2e%2e/outside/secret.png",
       "/file/%2e%2e%2foutside%2fsecret.png", "/file//etc/passwd", "/file/%2Fetc%2Fpasswd",
       "/file/escape.png", "/file/outdir/secret.png", "/thumb/escape.png",
       "/thumb/..%2f..%2fetc%2fpasswd", "/file/runs/demo/manifest.json",
       "/file/runs/%2e%2e/%2e%2e/outside/secret.png", "/static/../files.py",
       "/static/%2e%2e/files.py", "/runs/..%2f..", "/api/runs/%2e%2e"]


def test_raw_http_escapes_404_and_nothing_outside_is_opened(world, monkeypatch):
    """Raw request lines (no client-side normalisation) to a real uvicorn server."""
    root, secret = world
    opened = []
    real_open, real_os_open = builtins.open, os.open
    with thread_server(root) as base:
        port = int(base.rsplit(":", 1)[1])
        monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
        monkeypatch.setattr(os, "open", lambda f, *a, **k: (opened.append(str(f)), real_os_open(f, *a, **k))[1])
        try:
            for target in RAW:
                status, body = _raw_get(port, target)
                assert status == 404, (target, status, body[:200])
            status, body = _raw_get(port, "/file/inside.png")
            assert status == 200 and body[:4] == b"\x89PNG"
        finally:
            monkeypatch.undo()
    assert any(p.endswith("round_00/frame_000.png") for p in opened), "the spy saw no read"
    outside = str(secret.parent)
    assert not [p for p in opened if p.startswith(outside) or p in ("/etc/passwd",)], opened


def _mark(c, sid, eid, tab, scen, k, label):
    r = c.post(f"/api/sets/{sid}/marks", json={"id": eid, "tab": tab, "scenario": scen,
                                               "candidate": k, "label": label})
    assert r.status_code == 200, r.text
    return r.json()


def test_two_tabs_undo_and_resend(labelled):
    root, c = labelled
    sid = c.get("/api/sets").json()["items"][0]["id"]
    _mark(c, sid, "tabA-0001", "A", "s0", 0, "winner")
    _mark(c, sid, "tabB-0001", "B", "s0", 1, "loser")      # B never saw A's mark
    _mark(c, sid, "tabA-0002", "A", "s0", 1, "winner")      # A overrides B on candidate 1
    res = _mark(c, sid, "tabB-0002", "B", "s0", 2, "loser")
    assert res["marks"]["s0"] == {"0": "winner", "1": "winner", "2": "loser"}
    # A undoes its last mark: B's earlier mark of candidate 1 shows again
    r = c.post(f"/api/sets/{sid}/marks", json={"id": "tabA-0003", "tab": "A", "undo": "tabA-0002"}).json()
    assert r["marks"]["s0"] == {"0": "winner", "1": "loser", "2": "loser"}
    assert r["progress"] == {"scenarios": 3, "labelled": 1}
    # a resend (same id) is not written twice
    again = _mark(c, sid, "tabB-0002", "B", "s0", 2, "loser")
    assert again["written"] is False
    lines = (root / "sets/a" / JOURNAL_NAME).read_text().splitlines()
    assert len(lines) == 5 and [json.loads(l)["id"] for l in lines][-1] == "tabA-0003"
    # clear
    assert "2" not in _mark(c, sid, "tabB-0003", "B", "s0", 2, "none")["marks"]["s0"]
    for bad in ({"id": "x-000001", "scenario": "nope", "candidate": 0, "label": "winner"},
                {"id": "x-000002", "scenario": "s0", "candidate": 4, "label": "winner"},
                {"id": "x-000003", "scenario": "s0", "candidate": 0, "label": "best"},
                {"id": "x-000004", "undo": "never-written"},
                {"id": "../../x", "scenario": "s0", "candidate": 0, "label": "winner"}):
        assert c.post(f"/api/sets/{sid}/marks", json=bad).status_code == 422, bad


def test_torn_journal_line(tmp_path):
    j = Journal(tmp_path / JOURNAL_NAME)
    j.append({"id": "e1", "scenario": "s", "candidate": 0, "label": "winner"})
    with open(j.path, "a") as f:
        f.write('{"id": "e2", "scenario": "s", "cand')      # killed mid-write
    j.append({"id": "e3", "scenario": "s", "candidate": 1, "label": "loser"})
    assert [e["id"] for e in j.events()] == ["e1", "e3"]
    assert j.marks() == {"s": {0: "winner", 1: "loser"}}
    assert fold([{"id": "a", "scenario": "s", "candidate": 0, "label": "winner"},
                 {"id": "b", "undo": "a"}]) == {}


def test_export_reads_back_with_the_trainers_loader(labelled, capsys):
    root, c = labelled
    sid = c.get("/api/sets").json()["items"][0]["id"]
    assert c.post(f"/api/sets/{sid}/export").status_code == 409        # nothing labelled yet
    _mark(c, sid, "e-000001", "A", "s0", 3, "winner")
    _mark(c, sid, "e-000002", "A", "s0", 0, "loser")
    _mark(c, sid, "e-000003", "A", "s0", 1, "loser")
    _mark(c, sid, "e-000004", "A", "s1", 2, "winner")                  # no loser: skipped
    res = c.post(f"/api/sets/{sid}/export").json()
    assert res == {"path": "sets/a/pairs.jsonl", "scenarios": 1, "pairs": 2, "skipped": ["s1", "s2"]}
    pairs = load_preference_pairs(root / "sets/a/pairs.jsonl")
    set_dir = (root / "sets/a").resolve()
    assert pairs.winners == [set_dir / "s0/cand_03.png"] * 2
    assert pairs.losers == [set_dir / "s0/cand_00.png", set_dir / "s0/cand_01.png"]
    assert pairs.references[0] == [set_dir / "s0/ref_00.png"] and pairs.scenario == ["s0", "s0"]
    assert pairs.prompts[0] == "scenario 0: a fox in the snow"
    # the CLI writes the same file elsewhere (paths relative to it)
    from pipelines.studio.cli import main
    assert main(["export", str(root / "sets/a"), "--out", str(root / "p2.jsonl")]) == 0
    assert "2 pairs from 1 scenario" in capsys.readouterr().out
    assert load_preference_pairs(root / "p2.jsonl").winners == pairs.winners
    assert main(["export", str(root)]) == 2
    assert "holds no candidates.json" in capsys.readouterr().err


def test_round_metrics_hook(world, monkeypatch):
    """Per-round metrics come from pipelines.world.metrics.round_metrics when it applies."""
    import sys
    import types

    root, _ = world
    c = TestClient(create_app(root))
    rid = c.get("/api/runs").json()["items"][0]["id"]
    fake = types.ModuleType("pipelines.world.metrics")
    seen = []

    def round_metrics(run_dir, manifest):
        seen.append((Path(run_dir), manifest["config"]["frames"]))
        return {r: {"identity_cross": 0.5 + 0.1 * r} for r in range(3)}

    fake.round_metrics = round_metrics
    monkeypatch.setitem(sys.modules, "pipelines.world", types.ModuleType("pipelines.world"))
    monkeypatch.setitem(sys.modules, "pipelines.world.metrics", fake)
    m = c.get(f"/api/runs/{rid}").json()["metrics"]
    assert m == {"0": {"identity_cross": 0.5}, "1": {"identity_cross": 0.6},
                 "2": {"identity_cross": pytest.approx(0.7)}}
    assert seen == [((root / "runs/demo").resolve(), 25)]
    fake.round_metrics = lambda run_dir, manifest: None              # not a run it reads
    assert c.get(f"/api/runs/{rid}").json()["metrics"] is None
    fake.round_metrics = lambda run_dir, manifest: 1 / 0
    assert c.get(f"/api/runs/{rid}").json()["metrics"] == {"error": "ZeroDivisionError: division by zero"}


def test_cli_errors_are_one_line(tmp_path, capsys):
    from pipelines.studio.cli import main
    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "is not a folder" in err and err.count("\n") == 1


def test_docs_pairs_example_is_what_the_trainer_reads(tmp_path):
    """The pairs.jsonl line shown in docs/studio.md loads with the trainer's loader."""
    import re

    from PIL import Image

    page = (Path(__file__).resolve().parents[1] / "docs" / "studio.md").read_text()
    body = re.search(r"relative to the file:\s*```json\n(.*?)\n```", page, re.S).group(1)
    obj = json.loads(body.replace('"..."', '"a prompt"'))
    for rel in obj["references"] + obj["winners"] + obj["losers"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / rel)
    (tmp_path / "pairs.jsonl").write_text(json.dumps(obj) + "\n")
    pairs = load_preference_pairs(tmp_path)
    assert len(pairs) == len(obj["winners"]) * len(obj["losers"]) == 2
