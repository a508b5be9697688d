"""ViStoryBench in and out, on a small dataset folder built here (no downloads).

Reading (en and ch, merged shot texts, reference images), errors that name story, shot
and field, the converter, and a round trip: import a story, run it on the tiny SDXL
preset, export, and read the export back by the evaluator's layout rules (~15 s).
"""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.story import StoryError, load_story
from pipelines.vistorybench import export_frames, read_outputs, read_story, story_ids
from pipelines.vistorybench.__main__ import main as vsb_main


def _shot(i, chars_en, chars_ch, scene="a snowy field"):
    return {
        "index": i,
        "Setting Description": {"en": scene, "ch": "雪地"},
        "Plot Correspondence": {"en": f"plot {i}", "ch": f"情节 {i}"},
        "Characters Appearing": {"en": chars_en, "ch": chars_ch},
        "Static Shot Description": {"en": f"script {i}", "ch": f"描述 {i}"},
        "Shot Perspective Design": {"en": "close-up", "ch": "特写"},
    }


STORY_01 = {
    "Story_type": {"en": "fairy tale", "ch": "童话"},
    "Shots": [_shot(1, ["Fox"], ["狐狸"]), _shot(2, ["Fox", "Snowman"], ["狐狸", "雪人"]),
              _shot(3, [], [])],
    "Characters": {
        "Fox": {"name_en": "Fox", "name_ch": "狐狸", "prompt_en": "a small red fox",
                "prompt_ch": "一只红色的小狐狸", "tag": "non_human"},
        "Snowman": {"name_en": "Snowman", "name_ch": "雪人", "prompt_en": "a snowman",
                    "prompt_ch": "一个雪人", "tag": "non_human"},
    },
}


def _png(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), color).save(path)


def _write_story(root, sid, obj, images=True):
    d = root / sid
    d.mkdir(parents=True)
    # a byte-order mark, as some of the published files have
    (d / "story.json").write_text("\ufeff" + json.dumps(obj, ensure_ascii=False),
                                  encoding="utf-8")
    if images:
        _png(d / "image" / "Fox" / "00.png", (200, 60, 20))
        _png(d / "image" / "Fox" / "01.jpg", (210, 70, 30))
        _png(d / "image" / "Snowman" / "00.png", (240, 240, 250))
    return d


@pytest.fixture()
def dataset(tmp_path):
    root = tmp_path / "ViStory"
    _write_story(root, "01", STORY_01)
    two = json.loads(json.dumps(STORY_01))
    two["Shots"] = two["Shots"][:2]
    _write_story(root, "02", two)
    (root / "notes").mkdir()   # not a story (not digits): ignored, as the loader does
    return root


def test_read_story_en_and_ch(dataset):
    assert story_ids(dataset) == ["01", "02"]
    story, idx = read_story(dataset / "01", "en")
    assert idx == [1, 2, 3]
    # camera; plot; script; "<name> is <description>" per character; setting
    assert story.frames[0].prompt == ("close-up;plot 1;script 1;Fox is a small red fox;"
                                      "a snowy field;")
    assert story.frames[1].prompt == ("close-up;plot 2;script 2;Fox is a small red fox;"
                                      "Snowman is a snowman;a snowy field;")
    assert story.frames[2].prompt == "close-up;plot 3;script 3;;a snowy field;"
    assert [f.characters for f in story.frames] == [("Fox",), ("Fox", "Snowman"), ()]
    fox = story.character("Fox")
    assert [Path(p).name for p in fox.reference_images] == ["00.png", "01.jpg"]
    assert "fairy tale" in story.title
    # the descriptions are already in the shot text: not appended a second time
    assert story.full_prompt(0) == story.frames[0].prompt

    ch, _ = read_story(dataset / "01", "ch")
    assert ch.frames[1].prompt == ("特写;情节 2;描述 2;狐狸 is 一只红色的小狐狸;"
                                   "雪人 is 一个雪人;雪地;")
    # characters keep their English keys (the image folders' names)
    assert ch.frames[1].characters == ("Fox", "Snowman")


def test_malformed_stories_name_story_shot_and_field(tmp_path):
    bad = json.loads(json.dumps(STORY_01))
    del bad["Shots"][1]["Setting Description"]
    bad["Shots"][2]["Characters Appearing"]["en"] = ["Foxx"]
    bad["Shots"][2]["Characters Appearing"]["ch"] = ["狐狸"]
    bad["Shots"][0]["Plot Correspondence"] = {"en": "only english"}
    bad["Characters"]["Fox"]["prompt_en"] = 3
    d = _write_story(tmp_path, "07", bad)
    with pytest.raises(StoryError) as e:
        read_story(d, "en")
    msg = str(e.value)
    assert "vistorybench story 07" in msg
    assert '"Shots"[1] (index 2) "Setting Description": missing' in msg
    assert "\"Shots\"[2] (index 3) \"Characters Appearing\": unknown character 'Foxx'" in msg
    assert '"Characters" "Fox" "prompt_en": expected a text, got 3' in msg
    with pytest.raises(StoryError) as e:
        read_story(d, "ch")
    assert '"Shots"[0] (index 1) "Plot Correspondence": no "ch" entry' in str(e.value)

    order = json.loads(json.dumps(STORY_01))
    order["Shots"][2]["index"] = 1
    with pytest.raises(StoryError, match=r"index 1\) \"index\": 1 after 2"):
        read_story(_write_story(tmp_path, "08", order), "en")
    (tmp_path / "09").mkdir()
    (tmp_path / "09" / "story.json").write_text("{not json")
    with pytest.raises(StoryError, match="story.json line 1 column 2: invalid JSON"):
        read_story(tmp_path / "09")


def test_converter_selects_stories_by_id(dataset, tmp_path, capsys):
    out = tmp_path / "converted"
    assert vsb_main(["convert", str(dataset), "--out", str(out), "--stories", "02"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["02.json"]
    conv = load_story(out / "02.json")
    orig, _ = read_story(dataset / "02")
    assert conv.to_json() == orig.to_json()
    lite = tmp_path / "lite.txt"
    lite.write_text("01\n02\n")
    assert vsb_main(["convert", str(dataset), "--out", str(out), "--stories-file",
                     str(lite), "--lang", "ch"]) == 0
    assert "雪人" in (out / "01.json").read_text(encoding="utf-8")
    assert vsb_main(["convert", str(dataset), "--out", str(out), "--stories", "01,05"]) == 2
    assert "story id(s) 05 not in" in capsys.readouterr().err
    bad = json.loads(json.dumps(STORY_01))
    bad["Shots"][0]["index"] = "one"
    _write_story(dataset, "03", bad)
    assert vsb_main(["convert", str(dataset), "--out", str(out)]) == 2
    assert '"Shots"[0] "index": expected an integer' in capsys.readouterr().err


def _evaluator_view(out, method):
    """The layout rules, checked on the paths themselves: method/mode/lang/timestamp/id."""
    found = {}
    for p in Path(out).rglob("*.png"):
        parts = p.relative_to(out).parts
        assert len(parts) == 6, parts
        m, mode, lang, ts, sid, name = parts
        assert m == method and lang in ("en", "ch") and re.fullmatch(r"\d{8}-\d{6}", ts)
        assert sid.isdigit() and re.fullmatch(r"\d{2}\.png", name)
        found.setdefault(sid, []).append(str(p))
    return {k: sorted(v) for k, v in found.items()}


def test_round_trip_on_the_tiny_model(dataset, tmp_path):
    pytest.importorskip("diffusers")
    from pipelines.story_iter import main

    run, exp = tmp_path / "run", tmp_path / "outputs"
    assert main(["--story", f"vistorybench:{dataset / '02'}", "--rounds", "1", "--steps", "1",
                 "--height", "64", "--width", "64", "--no-step-progress", "--out", str(run),
                 "--export", f"vistorybench:{exp}", "--method", "storyattn_sdxl"]) == 0
    m = json.loads((run / "manifest.json").read_text())
    assert m["vistorybench"] == {"lang": "en", "story_id": "02", "export": f"vistorybench:{exp}",
                                 "method": "storyattn_sdxl", "mode": "base"}
    # the characters' reference images joined round 1's references (2 frames + 3 images)
    assert m["rounds"]["1"]["num_refs"] == 5
    got = read_outputs(exp, "storyattn_sdxl", "base", "en")
    assert list(got) == ["02"] and [Path(p).name for p in got["02"]] == ["01.png", "02.png"]
    assert _evaluator_view(exp, "storyattn_sdxl") == got
    for i, p in enumerate(got["02"]):
        final = np.asarray(Image.open(run / "round_01" / f"frame_{i:03d}.png"))
        assert np.array_equal(np.asarray(Image.open(p)), final)
    # re-reading the dataset story pairs each exported shot with its shot
    _, idx = read_story(dataset / "02")
    assert [int(Path(p).stem) for p in got["02"]] == idx
    # a second export lands in its own timestamp folder; the reader takes the latest
    again = export_frames(got["02"], idx, exp, "storyattn_sdxl", "02", "en",
                          timestamp="29991231-235959")
    assert read_outputs(exp, "storyattn_sdxl")["02"][0].startswith(str(again))


def test_export_refusals(dataset, tmp_path, capsys):
    from pipelines.story_iter import main

    story = dataset / "01"
    for argv, msg in (
            (["--story", f"vistorybench:{story}", "--export", f"vistorybench:{tmp_path}"],
             "--export needs --method"),
            (["--export", f"vistorybench:{tmp_path}", "--method", "m"],
             "needs a ViStoryBench story"),
            (["--story", f"vistorybench:{dataset}", "--out", str(tmp_path / "o")],
             "the last part must be a story id")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err   # one line, no traceback
    with pytest.raises(ValueError, match="plain folder name"):
        export_frames([], [], tmp_path, "../up", "01", "en")
