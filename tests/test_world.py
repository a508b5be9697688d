"""The story world: renderer, exact reader, prompt grammar, data generators, metrics.

The reader is checked against the renderer's own ground truth (what it was asked to draw), on
clean frames and on corrupted ones; the metrics on frames whose answer is known by
construction (perfect, identities swapped, random identities, references pasted).
"""
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from pipelines.story import load_story
from pipelines.world import data as D
from pipelines.world import metrics as M
from pipelines.world import render as R
from pipelines.world.reader import UNKNOWN, read_image


def _random_scenes(n, seed):
    rng = np.random.default_rng(seed)
    ids = R.all_identities()
    out = []
    for k in range(n):
        scene, places = D.random_frame(rng, 1 + k % 2)
        pl = [R.Placement(ids[rng.integers(len(ids))], p, s) for s, p in places]
        out.append((scene, pl))
    return out


def _accuracy(corrupt, n=120, seed=0):
    right = total = 0
    for scene, pl in _random_scenes(n, seed):
        reading = read_image(corrupt(R.render_frame(scene, pl)))
        total += 2
        right += (reading.scene == scene) + (len(reading.characters) == len(pl))
        for p in pl:
            ch = reading.at(p.position)
            for a in R.ATTRIBUTES:
                total += 1
                right += ch is not None and ch[a] == getattr(p.identity, a)
            total += 1
            right += ch is not None and ch["size"] == p.size
    return right / total


def test_world_has_hundreds_of_identities_and_renders_deterministically():
    ids = R.all_identities()
    assert len(ids) == len(set(ids)) == 288
    pl = [R.Placement(ids[5], "left", "big"), R.Placement(ids[100], "right", "small")]
    a, b = R.render_frame("snow", pl), R.render_frame("snow", pl)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    with pytest.raises(ValueError, match="two characters in one slot"):
        R.render_frame("day", [pl[0], pl[0]])
    with pytest.raises(ValueError, match="scene"):
        R.render_frame("mars", [])


def test_every_character_fills_at_least_twelve_model_tokens():
    """Legibility: the models see 8 x 8 tokens of 8 x 8 px; every identity in every slot and
    size fills >= 1/8 of at least 12 of them (and the count is what the mask says)."""
    from pipelines.world.legibility import token_coverage

    cov = token_coverage(1 / 8)
    assert cov["tokens_per_frame"] == 64 and cov["min"] >= 12, cov
    p = R.Placement(R.Identity("square", "red", "solid", "none"), "centre", "big")
    m = R.character_mask(p)
    assert m.sum() == 40 * 30                        # a square fills its whole box
    # rows 14..53, columns 17..46: token rows 1..6 (row 1 holds 2 of its pixel rows), token
    # columns 2..5 (7, 8, 8, 7 px): 24 tokens touched, 20 of them at least half full
    assert R.character_tokens(p) == R.character_tokens(p, 1 / 64) == 24
    assert R.character_tokens(p, 1 / 2) == 20


def test_two_characters_stand_left_and_right_and_read_back():
    ids = R.all_identities()
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="left"):
        R.render_frame("day", [R.Placement(ids[0], "left"), R.Placement(ids[1], "centre")])
    with pytest.raises(D.PromptError, match="left and on the right"):
        D.parse_prompt("Pip big on the centre and Moss small on the right, day")
    for _ in range(60):
        a, b = (ids[i] for i in rng.choice(len(ids), 2, replace=False))
        sa, sb = (R.SIZES[i] for i in rng.integers(2, size=2))
        scene = list(R.SCENES)[rng.integers(len(R.SCENES))]
        r = read_image(R.render_frame(scene, [R.Placement(a, "left", sa),
                                              R.Placement(b, "right", sb)]))
        got = [(c["position"], c["size"], *(c[k] for k in R.ATTRIBUTES)) for c in r.characters]
        assert r.scene == scene and got == [("left", sa, *a.as_dict().values()),
                                            ("right", sb, *b.as_dict().values())]


def test_every_identity_size_and_slot_reads_back_exactly():
    """All 288 identities x 2 sizes, slots and scenes cycling: every attribute right."""
    wrong = []
    for k, ident in enumerate(R.all_identities()):
        for size in R.SIZES:
            pos = R.POSITIONS[k % 3]
            scene = list(R.SCENES)[k % len(R.SCENES)]
            reading = read_image(R.render_frame(scene, [R.Placement(ident, pos, size)]))
            ch = reading.at(pos)
            got = None if ch is None else (ch["shape"], ch["colour"], ch["pattern"],
                                           ch["accessory"], ch["size"])
            want = (ident.shape, ident.colour, ident.pattern, ident.accessory, size)
            if reading.scene != scene or len(reading.characters) != 1 or got != want:
                wrong.append((want, pos, scene, reading.scene, got))
    assert not wrong, f"{len(wrong)} misread, e.g. {wrong[:3]}"


def test_reader_on_clean_and_corrupted_frames():
    rng = np.random.default_rng(3)

    def noise(img):
        return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)

    def blur(img):
        return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(0.7)))

    def jpeg(img):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=70)
        return np.asarray(Image.open(buf).convert("RGB"))

    assert _accuracy(lambda x: x) >= 0.99
    assert _accuracy(noise) >= 0.97
    assert _accuracy(blur) >= 0.95
    assert _accuracy(jpeg) >= 0.90


def test_reader_is_graceful_on_images_that_are_not_world_frames():
    rng = np.random.default_rng(0)
    junk = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),        # noise
            np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 255, np.uint8),
            rng.random((32, 48, 3)),                                     # float, other size
            Image.new("L", (80, 80), 128)]                               # grey PIL, other size
    for img in junk:
        reading = read_image(img)
        assert reading.scene == UNKNOWN
        for ch in reading.characters:
            assert set(R.ATTRIBUTES) <= set(ch)
    # a scene with nothing on it: the scene, no characters
    assert read_image(R.render_frame("night")).as_dict() == {"scene": "night", "characters": []}
    # a body in a colour the world does not have reads as no palette colour
    img = R.render_frame("day", [R.Placement(R.Identity("square", "red", "solid", "none"))])
    img[img[..., 0] == 220] = (128, 128, 128)
    assert all(ch["colour"] != "red" for ch in read_image(img).characters)
    with pytest.raises(ValueError, match="RGB"):
        read_image(np.zeros((64, 64)))


def test_prompt_grammar_round_trips_and_names_its_errors():
    cast = [("Pip", "big", "left"), ("Moss", "small", "right")]
    p = D.frame_prompt("snow", cast)
    assert p == "Pip big on the left and Moss small on the right, snow"
    assert D.parse_prompt(p) == ("snow", cast)
    with pytest.raises(D.PromptError, match="scene"):
        D.parse_prompt("Pip big on the left, moon")
    with pytest.raises(D.PromptError, match="clause"):
        D.parse_prompt("Pip huge on the left, day")
    # no prompt states a look
    words = set(p.lower().replace(",", " ").split())
    look = {*R.SHAPES, *R.COLOURS, *R.PATTERNS, *R.ACCESSORIES} - {"none"}
    assert not words & look


def test_story_file_loads_with_the_story_format_and_matches_its_truth(tmp_path):
    path = D.make_story(tmp_path / "s", seed=4, frames=100)
    story = load_story(path)
    truth = D.load_truth(path)
    assert len(story.frames) == 100 and len(story.characters) == 2
    assert all(c.reference_images and c.description == "" for c in story.characters)
    assert story.full_prompt(0) == story.frames[0].prompt       # nothing about the look added
    duo = sum(len(f.characters) == 2 for f in story.frames)
    assert 15 <= duo <= 45
    for name, c in truth["characters"].items():
        ch = read_image(story.character(name).reference_images[0]).characters[0]
        assert {a: ch[a] for a in R.ATTRIBUTES} == c["identity"]
    # same seed, same bytes
    again = D.make_story(tmp_path / "t", seed=4, frames=100)
    assert again.read_text().replace("t", "") == path.read_text().replace("t", "")


def test_gsa_groups_and_dpo_pairs_load_with_the_trainers_readers(tmp_path):
    from pipelines.train.data import load_preference_pairs, load_story_groups

    train, held = D.split_identities()
    assert not set(train) & set(held) and len(train) + len(held) == 288
    root = D.make_gsa_groups(tmp_path / "g", n_groups=8, per_group=4, pool=train, pair_share=0.5)
    ds = load_story_groups(root)
    assert len(ds.groups) == 8 and len(ds) == 32
    n_names = []
    for grp in ds.groups:
        # within a group a name always has one look: read back from the images, each name's
        # identity (the character at the slot its prompt names) takes a single value
        looks = {}
        for i in grp:
            _, cast = D.parse_prompt(ds.captions[i])
            reading = read_image(ds.paths[i])
            assert len(reading.characters) == len(cast)
            for name, size, pos in cast:
                ch = reading.at(pos)
                looks.setdefault(name, set()).add(tuple(ch[a] for a in R.ATTRIBUTES))
        assert all(len(v) == 1 for v in looks.values())
        if len(looks) == 2:     # a pair group: two different characters
            assert len(set.union(*looks.values())) == 2
        n_names.append(len(looks))
    assert set(n_names) == {1, 2}      # both kinds of group are there
    lone = load_story_groups(D.make_gsa_groups(tmp_path / "l", n_groups=3, per_group=2, pool=train))
    assert all(len(D.parse_prompt(c)[1]) == 1 for c in lone.captions)   # the default: lone
    pairs = D.write_dpo_pairs(tmp_path / "g", [{"prompt": ds.captions[0],
                                                "references": ["g0000/00.png"],
                                                "winners": ["g0000/01.png"],
                                                "losers": ["g0001/00.png", "g0001/01.png"]}])
    pp = load_preference_pairs(pairs)
    assert len(pp) == 2 and json.loads(pairs.read_text().splitlines()[0])["scenario"] == "0"


def test_cast_groups_name_both_references_and_the_trainer_reads_them(tmp_path):
    """Every frame of a cast group reads its group's two reference frames (the trainer's
    "references" field), each lone, big, in the centre; the trainer draws exactly those."""
    import numpy as np

    from pipelines.train.data import DataError, load_story_groups

    train, _ = D.split_identities()
    root = D.make_cast_groups(tmp_path / "c", n_groups=6, per_group=5, pool=train)
    ds = load_story_groups(root)
    assert len(ds.groups) == 6 and len(ds) == 6 * 7
    duos = 0
    for i, refs in enumerate(ds.refs_of):
        names = {n for n, _, _ in D.parse_prompt(ds.captions[i])[1]}
        if refs is None:                           # a reference frame itself
            assert ds.paths[i].name.startswith("ref_")
            continue
        assert len(refs) == 2 and all(ds.group_of[r] == ds.group_of[i] for r in refs)
        ref_names = set()
        for r in refs:
            scene, cast = D.parse_prompt(ds.captions[r])
            assert [(s, p) for _, s, p in cast] == [("big", "centre")]
            ref_names.add(cast[0][0])
        assert names <= ref_names and len(ref_names) == 2
        duos += len(names) == 2
        # the frame's characters look like their references (read back from the pixels)
        reading = read_image(ds.paths[i])
        for name, size, pos in D.parse_prompt(ds.captions[i])[1]:
            r = next(r for r in refs if D.parse_prompt(ds.captions[r])[1][0][0] == name)
            want = read_image(ds.paths[r]).characters[0]
            assert all(reading.at(pos)[a] == want[a] for a in R.ATTRIBUTES)
    assert 0 < duos < 30
    # a line naming a reference that has no line of its own is refused in one line
    meta = root / "metadata.jsonl"
    lines = meta.read_text().splitlines()
    bad = json.loads(lines[2])
    bad["references"] = ["g0000/nothere.png"]
    meta.write_text("\n".join([lines[0], lines[1], json.dumps(bad)]) + "\n")
    with pytest.raises(DataError, match="is not another usable line"):
        load_story_groups(root)


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    path = D.make_story(tmp_path_factory.mktemp("story"), seed=1, frames=40)
    return load_story(path), D.load_truth(path)


def test_metrics_perfect_frames_score_one(story):
    st, truth = story
    s = M.score_frames(st, [D.render_truth_frame(truth, i) for i in range(40)])
    assert s["identity_cross"] == s["identity_cross_all"] == 1.0
    assert s["identity_self"] == s["prompt_adherence"] == 1.0
    assert s["copy_paste"] == 0.0


def test_metrics_swapped_and_random_identities_score_low(story):
    st, truth = story
    names = list(truth["characters"])
    ids = {n: R.Identity(**truth["characters"][n]["identity"]) for n in names}
    swapped = {names[0]: ids[names[1]], names[1]: ids[names[0]]}
    s = M.score_frames(st, [D.render_truth_frame(truth, i, swapped) for i in range(40)])
    assert s["identity_cross_all"] == 0.0 and s["identity_cross"] < 0.8
    assert s["identity_self"] == 1.0 and s["prompt_adherence"] == 1.0   # consistent, just wrong
    rng = np.random.default_rng(0)
    pool = R.all_identities()
    frames = [D.render_truth_frame(truth, i, {n: pool[rng.integers(288)] for n in names})
              for i in range(40)]
    s = M.score_frames(st, frames)
    assert s["identity_cross"] < M.CHANCE_IDENTITY_CROSS + 0.15
    assert s["identity_self"] < 0.6 and s["prompt_adherence"] == 1.0


def test_metrics_pasted_references_are_copy_paste(story):
    st, _ = story
    refs = {c.name: c.reference_images[0] for c in st.characters}
    s = M.score_frames(st, [refs[st.frames[i].characters[0]] for i in range(40)])
    assert s["copy_paste"] > 0.6 and s["prompt_adherence"] < 0.6


def test_posed_cast_groups_give_each_character_its_clean_or_posed_reference(tmp_path):
    """``posed=True``: each character of a frame reads its clean reference, its posed one
    (the character alone elsewhere, like a previous round's solo frame) or both, every one
    inside the character's box; the pixels of each reference show that character."""
    from pipelines.train.data import load_story_groups

    train, _ = D.split_identities()
    root = D.make_cast_groups(tmp_path / "p", n_groups=5, per_group=6, pool=train,
                              layout=True, posed=True)
    lines = [json.loads(l) for l in (root / "metadata.jsonl").read_text().splitlines()]
    kinds = set()
    for line in lines:
        if not line["file_name"].split("/")[1][0].isdigit():
            continue                                  # a reference (clean or posed) itself
        cast = D.parse_prompt(line["text"])[1]
        assert len(line["references"]) == len(line["regions"]) <= 2 * len(cast)
        frame = read_image(root / line["file_name"])
        for ref, box in zip(line["references"], line["regions"]):
            kinds.add(ref.split("/")[1][:4])
            ref_cast = D.parse_prompt(next(l["text"] for l in lines if l["file_name"] == ref))[1]
            name, size, pos = next(c for c in cast if c[0] == ref_cast[0][0])
            assert box == list(R.character_box(pos, size))
            want = read_image(root / ref).characters[0]
            assert all(frame.at(pos)[a] == want[a] for a in R.ATTRIBUTES)
    assert kinds == {"ref_", "pose"}
    assert len(load_story_groups(root).groups) == 5


def test_described_base_captions_say_the_drawn_look_and_leave_the_rest_unchanged():
    """The SDXL base's captions: a described share names each character by its look (as the
    reader reads the frame), and share 0 gives exactly the frames it always gave."""
    from pipelines.model_presets import WORLD_SDXL_WORDS, clip_tokenizer

    plain = D.make_base_frames(40, seed=3)
    said = D.make_base_frames(40, seed=3, described_share=1.0)
    assert [p for _, p in plain] == [p for _, p in D.make_base_frames(40, seed=3, described_share=0)]
    n_said = 0
    for (img, p0), (img1, p1) in zip(plain, said):
        assert np.array_equal(img, img1)          # the same frames, other words
        looks = [c for c in read_image(img).characters]
        for c in looks:
            look = D.describe(R.Identity(c["shape"], c["colour"], c["pattern"], c["accessory"]))
            assert f"{look} {c['size']} on the {c['position']}" in p1, (p1, c)
            n_said += 1
        assert not any(n in p1.split() for n in D.NAMES), p1
    assert n_said >= 40
    assert D.describe(R.Identity("circle", "red", "stripe", "hat")) == "red striped circle with hat"
    assert D.describe(R.Identity("square", "blue", "solid", "none")) == "blue square"
    # the SDXL tokenizer reads every look word whole (one token), so a duo caption fits
    tok = clip_tokenizer(32, WORLD_SDXL_WORDS)
    for w in D.DESCRIPTION_WORDS:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    half = D.make_base_frames(400, seed=3, described_share=0.5)
    share = np.mean([not any(n in p.split() for n in D.NAMES) for _, p in half])
    assert 0.4 < share < 0.6


def test_ip_pairs_posed_references_keep_the_look_and_vary_the_slot():
    from pipelines.world_build.train_sdxl import make_ip_pairs

    train, _ = D.split_identities(0)
    assert all(np.array_equal(a[0], b[0]) and a[2] == b[2] for a, b in
               zip(make_ip_pairs(30, 5, train), make_ip_pairs(30, 5, train, posed_share=0.0)))
    slots = set()
    for ref, img, prompt in make_ip_pairs(60, 5, train, posed_share=1.0):
        r, f = read_image(ref).characters, read_image(img).characters
        assert len(r) == len(f) == 1
        assert all(r[0][a] == f[0][a] for a in ("shape", "colour", "pattern", "accessory"))
        slots.add((r[0]["position"], r[0]["size"]))
    assert len(slots) >= 5                        # posed: any slot and size, not centre-big only
