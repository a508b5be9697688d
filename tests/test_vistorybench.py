"""ViStoryBench in and out, on official-layout dataset folders built here (no downloads).

Reading (en and ch, the official prompt merge, reference images), one-line errors that
name story, shot and field, refusals of stories the evaluator cannot score, the Lite
split, one timestamp per run, exports that leave no stray folder even when interrupted,
and a round trip: import a story, run it on the tiny SDXL preset, export, and read the
export back by the evaluator's layout rules (~15 s).
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.story import StoryError, load_story
from pipelines.vistorybench import export_frames, read_outputs, read_story, story_ids
from pipelines.vistorybench.__main__ import main as vsb_main
from pipelines.vistorybench.splits import lite_ids

ROOT = Path(__file__).resolve().parents[1]


def _shot(i, chars_en, chars_ch, scene="a snowy field"):
    return {
        "index": i,
        "Setting Description": {"en": scene, "ch": "雪地"},
        "Plot Correspondence": {"en": f"plot {i}", "ch": f"情节 {i}"},
        "Characters Appearing": {"en": chars_en, "ch": chars_ch},
        "Static Shot Description": {"en": f"script {i}", "ch": f"描述 {i}"},
        "Shot Perspective Design": {"en": "close-up", "ch": "特写"},
    }


# The fox's name differs everywhere: key/"Characters Appearing".en "Fox", name_en
# "Little Fox", name_ch "小狐狸", and the shots call it "狐狸" and "小狐" in Chinese.
STORY_01 = {
    "Story_type": {"en": "fairy tale", "ch": "童话"},
    "Shots": [_shot(1, ["Fox"], ["狐狸"]), _shot(2, ["Fox", "Snowman"], ["小狐", "雪人"]),
              _shot(3, [], [])],
    "Characters": {
        "Fox": {"name_en": "Little Fox", "name_ch": "小狐狸", "prompt_en": "a small red fox",
                "prompt_ch": "一只红色的小狐狸", "tag": "non_human"},
        "Snowman": {"name_en": "Snowman", "name_ch": "雪人", "prompt_en": "a snowman",
                    "prompt_ch": "一个雪人", "tag": "non_human"},
    },
}


def _official_prompts(obj, lang):
    """The merge rule of ViStoryBench's loader, restated independently of the code under
    test: camera;plot;script;<Characters Appearing[lang] entry> is <prompt_lang>;...;scene;"""
    out = []
    for s in obj["Shots"]:
        people = ";".join(f"{name} is {obj['Characters'][key][f'prompt_{lang}']}"
                          for key, name in zip(s["Characters Appearing"]["en"],
                                               s["Characters Appearing"][lang]))
        out.append(f"{s['Shot Perspective Design'][lang]};{s['Plot Correspondence'][lang]};"
                   f"{s['Static Shot Description'][lang]};{people};"
                   f"{s['Setting Description'][lang]};")
    return out


def _png(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), color).save(path)


def _write_story(root, sid, obj, images=("Fox", "Snowman")):
    d = root / sid
    d.mkdir(parents=True)
    # a byte-order mark, as some of the published files have
    (d / "story.json").write_text("\ufeff" + json.dumps(obj, ensure_ascii=False),
                                  encoding="utf-8")
    if "Fox" in images:
        _png(d / "image" / "Fox" / "00.png", (200, 60, 20))
        _png(d / "image" / "Fox" / "01.jpg", (210, 70, 30))
    if "Snowman" in images:
        _png(d / "image" / "Snowman" / "00.png", (240, 240, 250))
    return d


def _copy(obj):
    return json.loads(json.dumps(obj))


@pytest.fixture()
def dataset(tmp_path):
    root = tmp_path / "ViStory"
    _write_story(root, "01", STORY_01)
    two = _copy(STORY_01)
    two["Shots"] = two["Shots"][:2]
    _write_story(root, "02", two)
    (root / "notes").mkdir()   # not a story (not digits): ignored, as the loader does
    return root


def _one_line_error(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _official_run_folders(out):
    """The evaluator's reader on every run folder: int() on each folder inside it."""
    for ts in Path(out).glob("*/*/*/*"):
        if ts.is_dir():
            for d in ts.iterdir():
                if d.is_dir():
                    int(d.name)   # raises ValueError on a stray folder, as the reader does


# -- 3. the official prompt merge ---------------------------------------------------------

def test_read_story_follows_the_official_merge_in_en_and_ch(dataset):
    assert story_ids(dataset) == ["01", "02"]
    story, idx = read_story(dataset / "01", "en")
    assert idx == [1, 2, 3]
    assert [f.prompt for f in story.frames] == _official_prompts(STORY_01, "en")
    assert story.frames[1].prompt == ("close-up;plot 2;script 2;Fox is a small red fox;"
                                      "Snowman is a snowman;a snowy field;")
    assert story.frames[2].prompt == "close-up;plot 3;script 3;;a snowy field;"
    # the shot's own name, not the character's name_en
    assert "Little Fox" not in "".join(f.prompt for f in story.frames)
    assert [f.characters for f in story.frames] == [("Fox",), ("Fox", "Snowman"), ()]
    fox = story.character("Fox")
    assert [Path(p).name for p in fox.reference_images] == ["00.png", "01.jpg"]
    assert "fairy tale" in story.title
    # the descriptions are already in the shot text: not appended a second time
    assert story.full_prompt(0) == story.frames[0].prompt

    ch, _ = read_story(dataset / "01", "ch")
    assert [f.prompt for f in ch.frames] == _official_prompts(STORY_01, "ch")
    # each shot names the fox its own way; name_ch (小狐狸) appears only inside the prompt
    assert ch.frames[0].prompt == "特写;情节 1;描述 1;狐狸 is 一只红色的小狐狸;雪地;"
    assert ch.frames[1].prompt == "特写;情节 2;描述 2;小狐 is 一只红色的小狐狸;雪人 is 一个雪人;雪地;"
    assert "小狐狸 is" not in "".join(f.prompt for f in ch.frames)
    # characters keep their English keys (the image folders' names)
    assert ch.frames[1].characters == ("Fox", "Snowman")


# -- 1. a character without reference images ----------------------------------------------

def test_a_character_without_reference_images_is_refused_before_anything_loads(
        tmp_path, capsys):
    root = tmp_path / "ViStory"
    d = _write_story(root, "03", STORY_01, images=("Fox",))   # no image/Snowman/
    with pytest.raises(StoryError) as e:
        read_story(d, "en")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"vistorybench story 03 ({d}): ")
    assert f'"Characters" "Snowman": no reference images: folder {d / "image" / "Snowman"} ' \
           "is missing" in msg
    (d / "image" / "Snowman").mkdir()   # there, but empty: the evaluator takes images[0]
    with pytest.raises(StoryError, match=r'"Snowman": no reference images: folder .* holds no'):
        read_story(d, "ch")

    from pipelines.story_iter import main

    out = tmp_path / "run"
    assert main(["--story", f"vistorybench:{d}", "--out", str(out), "--steps", "1",
                 "--export", f"vistorybench:{tmp_path / 'exp'}", "--method", "m"]) == 2
    err = _one_line_error(capsys)
    assert "vistorybench story 03" in err and '"Snowman"' in err
    assert str(d / "image" / "Snowman") in err
    assert not out.exists() and not (tmp_path / "exp").exists()   # refused before any work
    assert vsb_main(["convert", str(root), "--out", str(tmp_path / "conv")]) == 2
    assert '"Snowman": no reference images' in _one_line_error(capsys)


# -- 2. one-line errors; dropping bad shots only when asked --------------------------------

def test_malformed_stories_one_line_naming_story_shot_and_field(tmp_path, capsys):
    bad = _copy(STORY_01)
    del bad["Shots"][1]["Setting Description"]
    bad["Shots"][2]["Characters Appearing"]["en"] = ["Foxx"]
    bad["Shots"][2]["Characters Appearing"]["ch"] = ["狐狸"]
    bad["Shots"][0]["Plot Correspondence"] = {"en": "only english"}
    bad["Characters"]["Fox"]["prompt_en"] = 3
    d = _write_story(tmp_path, "07", bad)
    with pytest.raises(StoryError) as e:
        read_story(d, "en")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"vistorybench story 07 ({d}): ")
    assert '"Shots"[1] (index 2) "Setting Description": missing' in msg
    assert "\"Shots\"[2] (index 3) \"Characters Appearing\": unknown character 'Foxx'" in msg
    assert '"Characters" "Fox" "prompt_en": expected a text, got 3' in msg
    with pytest.raises(StoryError) as e:
        read_story(d, "ch")
    assert '"Shots"[0] (index 1) "Plot Correspondence": no "ch" entry' in str(e.value)

    order = _copy(STORY_01)
    order["Shots"][2]["index"] = 1
    with pytest.raises(StoryError, match=r"index 1\) \"index\": 1 after 2"):
        read_story(_write_story(tmp_path, "08", order), "en")
    (tmp_path / "09").mkdir()
    (tmp_path / "09" / "story.json").write_text("{not json")
    with pytest.raises(StoryError, match="story.json line 1 column 2: invalid JSON"):
        read_story(tmp_path / "09")

    # the case, through both programs: exactly one line on stderr
    one = _copy(STORY_01)
    del one["Shots"][1]["Setting Description"]
    root = tmp_path / "ViStory"
    d = _write_story(root, "09", one)
    from pipelines.story_iter import main

    assert main(["--story", f"vistorybench:{d}", "--out", str(tmp_path / "r")]) == 2
    err = _one_line_error(capsys)
    assert f'vistorybench story 09 ({d}): "Shots"[1] (index 2) "Setting Description": ' \
           "missing" in err
    assert vsb_main(["convert", str(root), "--out", str(tmp_path / "c")]) == 2
    assert '"Shots"[1] (index 2) "Setting Description": missing' in _one_line_error(capsys)


def test_skip_bad_shots_drops_them_as_the_official_loader_does(tmp_path, capsys):
    one = _copy(STORY_01)
    del one["Shots"][1]["Setting Description"]
    root = tmp_path / "ViStory"
    d = _write_story(root, "09", one)
    warned = []
    story, idx = read_story(d, "ch", skip_bad_shots=True, warn=warned.append)
    assert idx == [1, 3]
    kept = _copy(STORY_01)
    kept["Shots"] = [kept["Shots"][0], kept["Shots"][2]]
    assert [f.prompt for f in story.frames] == _official_prompts(kept, "ch")
    assert len(warned) == 1 and '"Shots"[1] (index 2) dropped' in warned[0]
    assert "Setting Description" in warned[0] and "vistorybench story 09" in warned[0]
    # only missing fields are dropped: a wrong value still stops the story
    one["Shots"][0]["index"] = "one"
    (d / "story.json").write_text(json.dumps(one, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(StoryError, match='"Shots"\\[0\\] "index": expected an integer'):
        read_story(d, "en", skip_bad_shots=True, warn=warned.append)
    one["Shots"][0]["index"] = 1
    (d / "story.json").write_text(json.dumps(one, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "conv"
    assert vsb_main(["convert", str(root), "--out", str(out), "--skip-bad-shots"]) == 0
    assert "dropped" in capsys.readouterr().err
    assert len(load_story(out / "09.json").frames) == 2


def test_converter_selects_stories_by_id(dataset, tmp_path, capsys):
    out = tmp_path / "converted"
    assert vsb_main(["convert", str(dataset), "--out", str(out), "--stories", "02"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["02.json"]
    conv = load_story(out / "02.json")
    orig, _ = read_story(dataset / "02")
    assert conv.to_json() == orig.to_json()
    ids = tmp_path / "ids.txt"
    ids.write_text("01  # the first\n02\n")
    assert vsb_main(["convert", str(dataset), "--out", str(out), "--stories-file",
                     str(ids), "--lang", "ch"]) == 0
    assert "雪人" in (out / "01.json").read_text(encoding="utf-8")
    assert vsb_main(["convert", str(dataset), "--out", str(out), "--stories", "01,05"]) == 2
    assert "story id(s) 05 not in" in capsys.readouterr().err
    bad = _copy(STORY_01)
    bad["Shots"][0]["index"] = "one"
    _write_story(dataset, "03", bad)
    assert vsb_main(["convert", str(dataset), "--out", str(out)]) == 2
    assert '"Shots"[0] "index": expected an integer' in capsys.readouterr().err


# -- 5. the Lite split ---------------------------------------------------------------------

def test_lite_split_is_carried_as_data(tmp_path, capsys):
    lite = lite_ids()
    assert len(lite) == len(set(lite)) == 20 and lite == sorted(lite, key=int)
    assert all(1 <= int(s) <= 80 and len(s) == 2 for s in lite)
    assert lite[:3] == ["01", "08", "09"] and lite[-1] == "79"
    about = json.loads((ROOT / "pipelines" / "vistorybench" / "lite.json").read_text())["about"]
    assert "ViStoryBench/vistorybench" in about and "bench_run.py" in about

    root = tmp_path / "ViStory"
    for sid in ("01", "02", "08"):
        _write_story(root, sid, STORY_01)
    assert vsb_main(["convert", str(root), "--out", str(tmp_path / "x"), "--split", "lite"]) == 2
    err = _one_line_error(capsys)
    assert "--split lite needs stories 09, 15," in err and "79" in err and "08," not in err
    for sid in lite:
        if not (root / sid).exists():
            _write_story(root, sid, STORY_01)
    out = tmp_path / "lite"
    assert vsb_main(["convert", str(root), "--out", str(out), "--split", "lite"]) == 0
    assert sorted(p.stem for p in out.iterdir()) == lite          # not 02: not in Lite
    full = tmp_path / "full"
    assert vsb_main(["convert", str(root), "--out", str(full), "--split", "full"]) == 0
    assert sorted(p.stem for p in full.iterdir()) == sorted(lite + ["02"])


# -- 4. one timestamp per run --------------------------------------------------------------

def _fake_run(tmp_path, name, story_dir, colors, lang="en"):
    """A finished story_iter output folder (manifest + last round's frames), without
    drawing: what ``export`` reads."""
    run = tmp_path / name
    for i, c in enumerate(colors):
        _png(run / "round_01" / f"frame_{i:03d}.png", c)
    (run / "manifest.json").write_text(json.dumps({
        "status": "complete", "story": {"source": f"vistorybench:{story_dir}"},
        "config": {"rounds": 1, "frames": len(colors)},
        "vistorybench": {"lang": lang, "story_id": story_dir.name}}))
    return run


def test_export_of_many_runs_lands_under_one_timestamp(dataset, tmp_path, capsys):
    r1 = _fake_run(tmp_path, "r1", dataset / "01", [(1, 0, 0), (2, 0, 0), (3, 0, 0)])
    r2 = _fake_run(tmp_path, "r2", dataset / "02", [(4, 0, 0), (5, 0, 0)])
    out = tmp_path / "outputs"
    assert vsb_main(["export", str(r1), str(r2), "--to", str(out), "--method", "m"]) == 0
    runs = list((out / "m" / "base" / "en").iterdir())
    assert len(runs) == 1 and re.fullmatch(r"\d{8}-\d{6}", runs[0].name)   # one run
    assert sorted(p.name for p in runs[0].iterdir()) == ["01", "02"]
    got = read_outputs(out, "m", "base", "en", timestamp=runs[0].name)
    assert [Path(p).name for p in got["01"]] == ["01.png", "02.png", "03.png"]

    # a chosen timestamp; exporting the same pictures again is not a clash (a rerun)
    for _ in range(2):
        assert vsb_main(["export", str(r1), str(r2), "--to", f"vistorybench:{out}",
                         "--method", "m", "--timestamp", "20250102-030405"]) == 0
    assert sorted(p.name for p in (out / "m/base/en/20250102-030405").iterdir()) == ["01", "02"]
    r1b = _fake_run(tmp_path, "r1b", dataset / "01", [(9, 9, 9)] * 3)
    assert vsb_main(["export", str(r1b), "--to", str(out), "--method", "m",
                     "--timestamp", "20250102-030405"]) == 2
    assert "exists already with other pictures; pick another --timestamp" in \
        _one_line_error(capsys)
    for ts in ("2025-01-02", "20251302-030405", "20250102-030465"):
        assert vsb_main(["export", str(r1), "--to", str(out), "--method", "m",
                         "--timestamp", ts]) == 2
        assert f"timestamp {ts!r}: expected a date and time" in _one_line_error(capsys)
    assert vsb_main(["export", str(r1), str(r1), "--to", str(out), "--method", "m"]) == 2
    assert "are both story 01 (en)" in _one_line_error(capsys)


def test_round_trip_on_the_tiny_model(dataset, tmp_path):
    pytest.importorskip("diffusers")
    from pipelines.story_iter import main

    run, exp = tmp_path / "run", tmp_path / "outputs"
    assert main(["--story", f"vistorybench:{dataset / '02'}", "--rounds", "1", "--steps", "1",
                 "--height", "64", "--width", "64", "--no-step-progress", "--out", str(run),
                 "--export", f"vistorybench:{exp}", "--method", "storyattn_sdxl",
                 "--timestamp", "20250101-120000"]) == 0
    m = json.loads((run / "manifest.json").read_text())
    assert m["vistorybench"] == {"lang": "en", "story_id": "02", "export": f"vistorybench:{exp}",
                                 "method": "storyattn_sdxl", "mode": "base",
                                 "timestamp": "20250101-120000", "skip_bad_shots": False}
    # the characters' reference images joined round 1's references (2 frames + 3 images)
    assert m["rounds"]["1"]["num_refs"] == 5
    assert m["prompts"][:2] == _official_prompts(STORY_01, "en")[:2]
    got = read_outputs(exp, "storyattn_sdxl", "base", "en")
    assert list(got) == ["02"] and [Path(p).name for p in got["02"]] == ["01.png", "02.png"]
    assert Path(got["02"][0]).parent == exp / "storyattn_sdxl/base/en/20250101-120000/02"
    for i, p in enumerate(got["02"]):
        final = np.asarray(Image.open(run / "round_01" / f"frame_{i:03d}.png"))
        assert np.array_equal(np.asarray(Image.open(p)), final)
    _, idx = read_story(dataset / "02")
    assert [int(Path(p).stem) for p in got["02"]] == idx
    # a second export lands in its own timestamp folder; the reader takes the latest
    again = export_frames(got["02"], idx, exp, "storyattn_sdxl", "02", "en",
                          timestamp="29991231-235959")
    assert read_outputs(exp, "storyattn_sdxl")["02"][0].startswith(str(again))
    assert read_outputs(exp, "storyattn_sdxl", timestamp="20250101-120000")["02"] == got["02"]


def test_export_refusals(dataset, tmp_path, capsys):
    from pipelines.story_iter import main

    story = dataset / "01"
    for argv, msg in (
            (["--story", f"vistorybench:{story}", "--export", f"vistorybench:{tmp_path}"],
             "--export needs --method"),
            (["--export", f"vistorybench:{tmp_path}", "--method", "m"],
             "needs a ViStoryBench story"),
            (["--story", f"vistorybench:{dataset}", "--out", str(tmp_path / "o")],
             "the last part must be a story id"),
            (["--story", f"vistorybench:{story}", "--timestamp", "20250101-120000"],
             "--timestamp names the run folder of --export"),
            (["--story", f"vistorybench:{story}", "--export", f"vistorybench:{tmp_path}",
              "--method", "m", "--timestamp", "yesterday"],
             "--timestamp: timestamp 'yesterday': expected a date and time as YYYYMMDD-HHMMSS"),
            (["--story", f"vistorybench:{story}", "--export", f"vistorybench:{tmp_path}",
              "--method", "m", "--frames", "2", "--out", str(tmp_path / "o")],
             "--frames 2 with --export: ViStoryBench's evaluator needs all 3 shots")):
        assert main(argv) == 2
        assert msg in _one_line_error(capsys)
    with pytest.raises(ValueError, match="plain folder name"):
        export_frames([], [], tmp_path, "../up", "01", "en")


# -- 6. no stray folders -------------------------------------------------------------------

def test_an_interrupted_export_leaves_no_stray_folder(tmp_path, monkeypatch):
    import pipelines.vistorybench.layout as layout

    frames = []
    for i in range(3):
        _png(tmp_path / "f" / f"{i}.png", (i, 0, 0))
        frames.append(str(tmp_path / "f" / f"{i}.png"))
    out = tmp_path / "outputs"
    export_frames(frames[:2], [1, 2], out, "m", "02", "en", timestamp="20250101-120000")
    calls = []
    real = layout.shutil.copyfile

    def copy_then_stop(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt   # Ctrl-C halfway through story 01
        return real(src, dst)

    monkeypatch.setattr(layout.shutil, "copyfile", copy_then_stop)
    with pytest.raises(KeyboardInterrupt):
        export_frames(frames, [1, 2, 3], out, "m", "01", "en", timestamp="20250101-120000")
    def disk_full(src, dst):
        calls.append(dst)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(layout.shutil, "copyfile", disk_full)
    with pytest.raises(OSError):   # a disk error in a fresh run folder
        export_frames(frames, [1, 2, 3], out, "m", "01", "en", timestamp="20250101-130000")
    assert len(calls) == 3
    monkeypatch.setattr(layout.shutil, "copyfile", real)
    # written into a temporary folder outside the run folders, never inside one
    assert all(".storyattn-export-" in str(Path(d).parent) and
               Path(d).parent.parent == out for d in calls)
    assert sorted(p.name for p in out.iterdir()) == ["m"]            # no temp left behind
    assert sorted(p.name for p in (out / "m/base/en").iterdir()) == ["20250101-120000"]
    assert sorted(p.name for p in (out / "m/base/en/20250101-120000").iterdir()) == ["02"]
    _official_run_folders(out)
    assert list(read_outputs(out, "m")) == ["02"]

    # killed outright (no cleanup runs): still nothing inside a run folder
    code = ("import os, shutil, sys\n"
            "import pipelines.vistorybench.layout as L\n"
            "real = shutil.copyfile\n"
            "n = []\n"
            "def cp(s, d):\n"
            "    n.append(d)\n"
            "    if len(n) == 2: os._exit(9)\n"
            "    return real(s, d)\n"
            "L.shutil.copyfile = cp\n"
            "L.export_frames(sys.argv[1:4], [1, 2, 3], sys.argv[4], 'm', '01', 'en',"
            " timestamp='20250101-120000')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code, *frames, str(out)], env=env, cwd=ROOT)
    assert r.returncode == 9
    assert sorted(p.name for p in (out / "m/base/en/20250101-120000").iterdir()) == ["02"]
    _official_run_folders(out)
    assert list(read_outputs(out, "m")) == ["02"]
    # and the story exports fine afterwards, into the same run
    export_frames(frames, [1, 2, 3], out, "m", "01", "en", timestamp="20250101-120000")
    assert list(read_outputs(out, "m", timestamp="20250101-120000")) == ["01", "02"]

    # the reader here is as strict as the evaluator's on a stray folder
    (out / "m/base/en/20250101-120000/.01.partial").mkdir()
    with pytest.raises(ValueError, match=r"\.01\.partial are not story ids"):
        read_outputs(out, "m")
