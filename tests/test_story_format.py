"""Story JSON format: parsing, validation messages that name the bad field, the demo."""
import json

import pytest

from pipelines.story import StoryError, demo_story, load_story, parse_story


def _story(**over):
    obj = {
        "title": "T",
        "style": "watercolor",
        "characters": [
            {"name": "Snowman", "description": "a snowman with a carrot nose"},
            {"name": "Fox", "description": "a red fox"},
        ],
        "frames": [
            {"prompt": "a snowman in a field", "characters": ["Snowman"]},
            {"prompt": "a fox in the woods", "characters": ["Fox"]},
            {"prompt": "they meet", "characters": ["Snowman", "Fox"]},
            {"prompt": "snow falls", "characters": []},
        ],
    }
    obj.update(over)
    return obj


def _errors(obj, **kw):
    with pytest.raises(StoryError) as ei:
        parse_story(obj, **kw)
    return ei.value.errors, str(ei.value)


def test_valid_story_and_prompts():
    s = parse_story(_story())
    assert [len(f.characters) for f in s.frames] == [1, 1, 2, 0]
    p = s.full_prompt(2)
    assert p.startswith("they meet") and "carrot nose" in p and "red fox" in p
    assert p.endswith("watercolor")
    assert s.full_prompt(3) == "snow falls, watercolor"
    assert s.truncated(2).frames == s.frames[:2]
    assert len(s.fingerprint()) == 64
    assert parse_story(s.to_json()).to_json() == s.to_json()


def test_regions_round_trip_and_keep_old_fingerprints():
    plain = parse_story(_story())
    obj = _story()
    obj["frames"][2]["regions"] = {"Snowman": [0, 0.1, 0.5, 1], "Fox": [0.5, 0.4, 1, 1]}
    s = parse_story(obj)
    f = s.frames[2]
    assert f.region("Snowman") == (0.0, 0.1, 0.5, 1.0) and f.region("Fox") == (0.5, 0.4, 1.0, 1.0)
    assert s.frames[0].region("Snowman") is None
    assert parse_story(s.to_json()).to_json() == s.to_json()
    assert "regions" not in plain.to_json()["frames"][2]
    # a layout is part of the story: it changes the fingerprint; none keeps the old one
    assert s.fingerprint() != plain.fingerprint()
    assert parse_story(_story()).fingerprint() == plain.fingerprint()


def test_unknown_character_names_the_field():
    obj = _story()
    obj["frames"].append({"prompt": "x", "characters": ["Foxx"]})
    errs, msg = _errors(obj)
    assert errs == ["frames[4].characters[0]: unknown character 'Foxx' (known: Snowman, Fox)"]
    assert "frames[4].characters[0]: unknown character 'Foxx'" in msg


@pytest.mark.parametrize("mutate, expected", [
    (lambda o: o.update(frames=[]), "frames: empty"),
    (lambda o: o.pop("frames"), "frames: missing"),
    (lambda o: o.update(frames="x"), "frames: expected a list, got str"),
    (lambda o: o["frames"][1].update(prompt=""), "frames[1].prompt: expected a non-empty string"),
    (lambda o: o["frames"][2].update(characters="Fox"), "frames[2].characters: expected a list"),
    (lambda o: o["frames"][2].update(characters=["Fox", "Fox"]),
     "frames[2].characters[1]: character 'Fox' listed twice"),
    (lambda o: o["frames"][0].update(camera="wide"), "frames[0].camera: unknown field"),
    (lambda o: o["frames"][2].update(regions=[0, 0, 1, 1]),
     "frames[2].regions: expected an object"),
    (lambda o: o["frames"][0].update(regions={"Fox": [0, 0, 1, 1]}),
     "frames[0].regions.Fox: 'Fox' is not one of the frame's characters (Snowman)"),
    (lambda o: o["frames"][2].update(regions={"Fox": [0.6, 0, 0.4, 1]}),
     "frames[2].regions.Fox: expected [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1"),
    (lambda o: o["frames"][2].update(regions={"Fox": [0, 0, 1]}),
     "frames[2].regions.Fox: expected [x0, y0, x1, y1]"),
    (lambda o: o["characters"].append({"name": "Fox", "description": "x"}),
     "characters[2].name: duplicate character 'Fox'"),
    (lambda o: o["characters"][0].update(name=""), "characters[0].name: expected a non-empty"),
    (lambda o: o["characters"][1].update(description=3),
     "characters[1].description: expected a string, got int"),
    (lambda o: o.update(title=["a"]), "title: expected a string, got list"),
    (lambda o: o.update(author="me"), "author: unknown field"),
    (lambda o: o["characters"][0].update(reference_images=["a.txt"]),
     "characters[0].reference_images[0]: 'a.txt' is not an image file"),
    (lambda o: o["characters"][0].update(reference_images=["missing.png"]),
     "characters[0].reference_images[0]: file not found"),
])
def test_errors_name_the_field(mutate, expected):
    obj = _story()
    mutate(obj)
    errs, _ = _errors(obj)
    assert any(e.startswith(expected) for e in errs), errs


def test_all_errors_reported_at_once():
    obj = _story()
    obj["frames"][0]["characters"] = ["Nobody"]
    obj["frames"][3]["prompt"] = 5
    errs, msg = _errors(obj)
    assert len(errs) == 2 and "2 error(s)" in msg


def test_load_story_file(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "snow.png")
    obj = _story()
    obj["characters"][0]["reference_images"] = ["snow.png"]
    f = tmp_path / "s.json"
    f.write_text(json.dumps(obj))
    s = load_story(f)
    assert s.characters[0].reference_images == (str(tmp_path / "snow.png"),)

    bad = tmp_path / "bad.json"
    bad.write_text('{"frames": [}')
    with pytest.raises(StoryError, match=r"(?s)bad.json: .*line 1 column 13: invalid JSON"):
        load_story(bad)
    with pytest.raises(StoryError, match="cannot read"):
        load_story(tmp_path / "nope.json")


def test_demo_story_is_100_valid_frames():
    s = demo_story()
    assert len(s.frames) == 100
    assert {c.name for c in s.characters} == {"Snowman", "Fox"}
    again = parse_story(s.to_json())
    assert again.to_json() == s.to_json()
    assert any(len(f.characters) == 2 for f in s.frames)


def test_cli_validate(tmp_path, capsys):
    from pipelines.story import main

    f = tmp_path / "s.json"
    obj = _story()
    obj["frames"][0]["characters"] = ["Foxx"]
    f.write_text(json.dumps(obj))
    assert main([str(f)]) == 2
    assert "frames[0].characters[0]: unknown character 'Foxx'" in capsys.readouterr().err
