"""The examples in docs/ run through the real loaders, so docs and code cannot drift.

Every fenced block preceded by ``<!-- docs-example: NAME -->`` in a docs/*.md page is
checked here: story files by ``pipelines.story``, ``metadata.jsonl`` / ``pairs.jsonl`` by
``pipelines.train.data``, Python examples by running them (and comparing what they print
with what the page says they print), the manifest example against the manifest a real
tiny run writes.  Also: nothing in the repository points outside it.
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_MARK = re.compile(r"<!-- docs-example: ([\w.\-]+) -->\s*\n```(\w*)\n(.*?)\n```", re.S)


def _examples():
    out = {}
    for page in sorted(DOCS.glob("*.md")):
        for name, lang, body in _MARK.findall(page.read_text()):
            assert name not in out, f"docs example {name!r} defined twice"
            out[name] = (page, lang, body)
    return out


EXAMPLES = _examples()


def _png(path: Path, color=(200, 30, 30)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_every_example_is_checked():
    assert set(EXAMPLES) == {"story", "metadata.jsonl", "pairs.jsonl", "manifest", "cache",
                             "backends"}


def test_docs_links_resolve_and_nothing_points_outside_the_repo():
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+\.md)\)", page.read_text()):
            assert (DOCS / target).is_file(), f"{page.name} links to missing {target}"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    outside = ("DES" + "IGN.md", ".." + "/sha" + "red")  # split: this file is no hit itself
    bad = []
    for f in files:
        p = ROOT / f
        if p.suffix in {".py", ".md", ".txt", ".cfg", ".ini", ".sh", ".toml"} and p.is_file():
            text = p.read_text(errors="replace")
            if any(s in text for s in outside):
                bad.append(f)
    assert not bad, f"files that refer to documents outside the repository: {bad}"


def test_story_example_parses_and_validates(tmp_path, capsys):
    from pipelines.story import StoryError, load_story, main

    page, lang, body = EXAMPLES["story"]
    f = tmp_path / "story.json"
    f.write_text(body)
    _png(tmp_path / "refs" / "snowman.png")
    story = load_story(f)
    assert [c.name for c in story.characters] == ["Snowman", "Fox"]
    assert len(story.frames) == 5 and story.frames[4].prompt == "snow falls on the empty field"
    assert story.frames[3].region("Fox") == (0.5, 0.4, 1.0, 1.0)
    assert story.characters[0].reference_images == (str(tmp_path / "refs" / "snowman.png"),)
    # the page spells out the third frame's full prompt
    assert _flat(story.full_prompt(2)) in _flat(page.read_text())
    assert main([str(f)]) == 0
    assert f"{f}: ok: 'The Snowman and the Fox', 2 characters, 5 frames" in capsys.readouterr().out
    # the page's error example: an unknown character and a missing reference image
    obj = json.loads(body)
    obj["frames"][1]["characters"] = ["Foxx"]
    (tmp_path / "refs" / "snowman.png").unlink()
    f.write_text(json.dumps(obj))
    with pytest.raises(StoryError) as e:
        load_story(f)
    assert e.value.errors == [
        f"characters[0].reference_images[0]: file not found: {tmp_path / 'refs' / 'snowman.png'}",
        "frames[1].characters[0]: unknown character 'Foxx' (known: Snowman, Fox)"]
    for err in e.value.errors:
        assert err.split(": ")[0] in page.read_text()
    assert main([str(f)]) == 2


def test_metadata_jsonl_example_loads(tmp_path):
    from pipelines.train.data import load_story_groups

    _, _, body = EXAMPLES["metadata.jsonl"]
    (tmp_path / "metadata.jsonl").write_text(body + "\n")
    for line in body.splitlines():
        _png(tmp_path / json.loads(line)["file_name"])
    ds = load_story_groups(tmp_path)
    assert ds.group_names == ["fox", "snowman"]
    assert [len(g) for g in ds.groups] == [3, 2]
    assert ds.captions[ds.paths.index((tmp_path / "snowman/002.png").resolve())] == \
        "the snowman waves"


def test_pairs_jsonl_example_loads(tmp_path):
    from pipelines.train.data import load_preference_pairs

    _, _, body = EXAMPLES["pairs.jsonl"]
    (tmp_path / "pairs.jsonl").write_text(body + "\n")
    for line in body.splitlines():
        obj = json.loads(line)
        for p in obj["references"] + [obj.get("winner"), obj.get("loser")] + \
                obj.get("winners", []) + obj.get("losers", []):
            if p:
                _png(tmp_path / p)
    pairs = load_preference_pairs(tmp_path)
    assert len(pairs) == 3
    assert [w.name for w in pairs.winners] == ["good.png", "w1.png", "w2.png"]
    assert [l.name for l in pairs.losers] == ["bad.png", "l1.png", "l1.png"]
    assert pairs.scenario == ["1", "stars", "stars"]


def _run_python(body: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(body, "<docs example>", "exec"), {"__name__": "__docs__"})
    return buf.getvalue()


def test_backends_example_runs():
    _, lang, body = EXAMPLES["backends"]
    assert lang == "python"
    out = _run_python(body).splitlines()
    assert "torch" in ast.literal_eval(out[0])
    import storyattn

    if "flash" not in storyattn.available_backends():
        assert "install with: pip install 'storyattn[flash]'" in out[1]


def test_cache_example_runs_and_prints_what_the_page_says(tmp_path, monkeypatch):
    page, lang, body = EXAMPLES["cache"]
    monkeypatch.chdir(tmp_path)
    out = _run_python(body).splitlines()
    shown = re.search(r"\nprints\n\n```\n(.*?)\n```", page.read_text(), re.S).group(1).splitlines()
    # the safetensors header's key order is not fixed: compare the dicts
    assert ast.literal_eval(out[0]) == ast.literal_eval(shown[0])
    assert out[1:] == shown[1:]


def _keys(d):
    return set(d) if isinstance(d, dict) else set()


def test_manifest_example_matches_a_real_run(tmp_path):
    """Same fields at every level as the manifest a tiny run writes; every field named
    on the page."""
    from pipelines.story_iter.cli import main

    page, _, body = EXAMPLES["manifest"]
    doc = json.loads(body)
    story = tmp_path / "two.json"
    story.write_text(json.dumps({"title": "Two frames", "style": "watercolor",
                                 "characters": [{"name": "Fox", "description": "a small red fox"}],
                                 "frames": [{"prompt": "a fox in the snow", "characters": ["Fox"]},
                                            "the empty field"]}))
    out = tmp_path / "run"
    assert main(["--story", str(story), "--backbone", "flux", "--rounds", "1", "--steps", "1",
                 "--refs", "topk:1", "--out", str(out), "--no-step-progress"]) == 0
    real = json.loads((out / "manifest.json").read_text())
    assert _keys(doc) == _keys(real)
    for key in ("config", "story", "versions"):
        assert _keys(doc[key]) == _keys(real[key]), key
    assert _keys(doc["rounds"]["1"]) == _keys(real["rounds"]["1"])
    assert _keys(doc["sessions"][0]) == _keys(real["sessions"][0])
    assert _keys(doc["sessions"][0]["preflight"]) == _keys(real["sessions"][0]["preflight"])
    # the example's values are what this run wrote, except times, sizes, paths, versions
    varying = {"created", "sessions", "rounds", "versions", "notes", "story", "config", "plan"}
    # the plan's rows hold paths: same labels, in order
    assert [k for k, _ in doc["plan"]] == [k for k, _ in real["plan"]]
    assert {k: v for k, v in doc.items() if k not in varying} == \
        {k: v for k, v in real.items() if k not in varying}
    text = page.read_text()
    named = set(re.findall(r"`([a-z_]+)`", text))
    every = (_keys(real) | _keys(real["config"]) | _keys(real["rounds"]["1"])
             | _keys(real["sessions"][0]) | _keys(real["sessions"][0]["preflight"])
             | {"earlier_sessions"})
    assert every <= named, f"fields not described on {page.name}: {sorted(every - named)}"
