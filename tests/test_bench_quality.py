"""benchmarks/bench_quality.py: the expectation rules (``judge``) on figures made to sit just
either side of each threshold, the average over stories (``mean_rows``), and a small real run
over two stories whose per-story figures equal those of the same stories benched alone."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_quality as BQ  # noqa: E402


def row(name, idc=0.5, ids=0.5, adh=0.5, cp=0.0, acc=0.5, solo=(0.5, 0.1), duo=(0.5, 0.1),
        **extra):
    cast = {k: {"identity_cross": v[0], "identity_cross_all": v[1], "appearances": 10}
            for k, v in (("solo", solo), ("duo", duo))}
    return {"row": name, "identity_cross": idc, "identity_cross_all": 0.1, "identity_self": ids,
            "prompt_adherence": adh, "copy_paste": cp, "frames": 10, "time_s": 1.0,
            "attribute_rate": {"shape": 0.5, "colour": 0.5, "pattern": 0.5, "accessory": acc},
            "adherence": {"scene": 1.0, "count": 0.5, "position": 0.5, "size": 0.5},
            "by_cast": cast, **extra}


def met(rows):
    BQ.judge(rows, chance=0.26)
    return {r["row"]: r["met"] for r in rows}


def test_judge_applies_each_rows_expectation():
    si = "Story-Iter FLUX+GSA with character refs"
    rows = [row(BQ.BASE, idc=0.30, adh=0.9),
            row(BQ.STAGE1, idc=0.9, adh=0.95, cp=0.05, acc=0.4, solo=(0.9, 0.7), duo=(0.85, 0.6)),
            row(BQ.NO_LAYOUT, idc=0.5), row(BQ.REPLAY, idc=0.88), row(BQ.DPO, idc=0.89, acc=0.51),
            row(f"{si}, round 0", ids=0.4, adh=0.8), row(f"{si}, round 1", ids=0.41, adh=0.79),
            row(f"{si}, round 2", ids=0.42, adh=0.77), row(f"{si}, round 3", ids=0.42, adh=0.8)]
    assert met(rows) == {BQ.BASE: True, BQ.STAGE1: True, BQ.NO_LAYOUT: None,   # no target
                         BQ.REPLAY: True, BQ.DPO: True,
                         f"{si}, round 0": True, f"{si}, round 1": True,
                         f"{si}, round 2": False,      # adherence 0.03 below round 0
                         f"{si}, round 3": False}      # identity-self not above round 2
    # each rule just failing
    rows[0]["identity_cross"] = 0.37          # 0.11 from chance
    rows[1]["copy_paste"] = 0.1
    rows[3]["identity_cross"] = 0.86          # 0.04 from stage 1
    rows[4]["attribute_rate"]["accessory"] = 0.49   # +9 points
    got = met(rows)
    assert not any(got[n] for n in (BQ.BASE, BQ.STAGE1, BQ.REPLAY, BQ.DPO))
    rows[1]["copy_paste"] = 0.0
    rows[4]["attribute_rate"]["accessory"] = 0.51
    rows[4]["identity_cross"] = 0.87          # identity lost by 0.03
    got = met(rows)
    assert got[BQ.STAGE1] and not got[BQ.DPO]
    for cast, fig in (("duo", (0.84, 0.6)), ("solo", (0.9, 0.59))):   # one cast just short
        rows[1]["by_cast"][cast].update(identity_cross=fig[0], identity_cross_all=fig[1])
        assert not met(rows)[BQ.STAGE1]
        rows[1]["by_cast"][cast].update(identity_cross=0.9, identity_cross_all=0.7)
    assert met(rows)[BQ.STAGE1]
    # above 0.8, DPO needs half the remaining gap: 0.9 -> 0.95
    rows[1]["attribute_rate"]["accessory"] = 0.9
    rows[4].update(identity_cross=0.9)
    rows[4]["attribute_rate"]["accessory"] = 0.949
    assert not met(rows)[BQ.DPO]
    rows[4]["attribute_rate"]["accessory"] = 0.95
    assert met(rows)[BQ.DPO]


def test_mean_rows_averages_each_figure_and_keeps_the_stories():
    a = [row(BQ.STAGE1, idc=0.4, acc=0.3), row(BQ.REPLAY, idc=0.5, max_pixel_diff=7)]
    b = [row(BQ.STAGE1, idc=0.6, acc=0.5), row(BQ.REPLAY, idc=0.1, cp=None, max_pixel_diff=90)]
    m = BQ.mean_rows([a, b], [300, 301])
    assert m[0]["identity_cross"] == pytest.approx(0.5)
    assert m[0]["attribute_rate"]["accessory"] == pytest.approx(0.4)
    assert m[1]["copy_paste"] == 0.0          # a story without eligible frames is left out
    assert m[1]["max_pixel_diff"] == 90 and m[0]["frames"] == 20
    assert [p["story_seed"] for p in m[0]["per_story"]] == [300, 301]
    assert [p["accessory"] for p in m[0]["per_story"]] == [0.3, 0.5]


def test_two_stories_average_the_stories_benched_alone(tmp_path):
    from pipelines.world import weights as W

    if not W.available():
        pytest.skip("no committed world weights")
    common = ["--frames", "2", "--steps", "2", "--skip-story-iter"]
    assert BQ.main(common + ["--seed", "301", "--results-dir", str(tmp_path / "one")]) == 0
    assert BQ.main(common + ["--seed", "300", "--stories", "2",
                             "--results-dir", str(tmp_path / "two")]) == 0
    one = json.loads(next((tmp_path / "one").glob("*.json")).read_text())
    two = json.loads(next((tmp_path / "two").glob("*.json")).read_text())
    assert two["environment"]["story_seeds"] == [300, 301]
    for r1, r2 in zip(one["rows"], two["rows"]):
        assert r1["row"] == r2["row"]
        p = r2["per_story"][1]
        assert p["story_seed"] == 301
        assert p["identity_cross"] == pytest.approx(r1["identity_cross"])
        assert p["accessory"] == pytest.approx(r1["attribute_rate"]["accessory"])
        mean = (r2["per_story"][0]["identity_cross"] + p["identity_cross"]) / 2
        assert r2["identity_cross"] == pytest.approx(mean)
    md = next((tmp_path / "two").glob("*.md")).read_text()
    assert "accessory by story" in md and "id-cross by story" in md


def test_bad_arguments_get_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        BQ.main(["--stories", "0"])
    assert e.value.code == 2 and "--stories must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        BQ.main(["--weights", str(tmp_path)])
    assert f"no world weights in {tmp_path}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        BQ.main(["--only-dpo", "--only-sdxl"])
    assert "pick one set of rows" in capsys.readouterr().err


def test_only_dpo_gives_the_stage1_and_dpo_rows_as_the_full_table_does(tmp_path):
    from pipelines.world import weights as W

    if not W.available():
        pytest.skip("no committed world weights")
    common = ["--frames", "2", "--steps", "2", "--seed", "302"]
    assert BQ.main(common + ["--only-dpo", "--results-dir", str(tmp_path / "dpo")]) == 0
    assert BQ.main(common + ["--skip-story-iter", "--results-dir", str(tmp_path / "all")]) == 0
    dpo = json.loads((tmp_path / "dpo" / "bench_quality_dpo_cpu.json").read_text())
    full = {r["row"]: r for r in json.loads(next((tmp_path / "all").glob("*.json"))
                                            .read_text())["rows"]}
    assert [r["row"] for r in dpo["rows"]] == [BQ.STAGE1, BQ.DPO]
    for r in dpo["rows"]:
        assert r["identity_cross"] == pytest.approx(full[r["row"]]["identity_cross"])
        assert r["attribute_rate"] == pytest.approx(full[r["row"]]["attribute_rate"])
