"""Preference pools of two-character layout scenarios (stage 2 where stage 1 fails most):
the world's scenarios with duos and boxes, the labeller's rule per character on rendered
candidates whose right label is known by construction, through a real studio, and the
export's boxes read back by the DPO data reader."""

import pytest

from pipelines.world import data as D
from pipelines.world import render as R
from pipelines.world.scenarios import load_truth, make_scenarios


def test_duo_layout_scenarios(tmp_path):
    from pipelines.candidates.scenarios import load_scenarios
    from pipelines.world.reader import read_image

    scen = make_scenarios(tmp_path / "mix", n=12, seed=4, duo_share=0.5, layout=True)
    train, held = D.split_identities(0)
    truth = load_truth(scen.parent)
    sizes = []
    for s in load_scenarios(scen):
        t = truth[s.id]
        scene, cast = D.parse_prompt(s.prompt)
        assert scene == t["scene"] and [list(c) for c in cast] == t["cast"]
        assert s.characters == [c[0] for c in cast] and len(set(s.characters)) == len(cast)
        sizes.append(len(cast))
        for name, ref, box, (_, size, pos) in zip(s.characters, s.references, s.regions, cast):
            ident = t["identities"][name]
            assert ident in train and ident not in held
            (ch,) = read_image(ref).characters
            assert (ch["accessory"], ch["colour"]) == (ident.accessory, ident.colour)
            assert box == list(R.character_box(pos, size))
        if len(cast) == 2:
            assert [c[2] for c in cast] == list(R.DUO_POSITIONS)
    assert set(sizes) == {1, 2}
    # the defaults write exactly the lone, box-less scenarios they always did
    a = make_scenarios(tmp_path / "a", n=5, seed=4)
    b = make_scenarios(tmp_path / "b", n=5, seed=4, duo_share=0.0, layout=False)
    assert a.read_text() == b.read_text() and "regions" not in a.read_text()
    with pytest.raises(ValueError, match="duo_share must be in"):
        make_scenarios(tmp_path / "c", n=1, duo_share=1.5)


def _swap(a, b):
    return (R.Identity(a.shape, a.colour, a.pattern, b.accessory),
            R.Identity(b.shape, b.colour, b.pattern, a.accessory))


def test_labeller_reads_each_character_at_its_slot(tmp_path):
    pytest.importorskip("uvicorn")
    from _studio_data import thread_server
    from _world_sets import draw_candidates, finish_set, start_set
    from pipelines.train.data import load_preference_pairs
    from pipelines.world_build.label import label_set

    scenarios, truth, m, out = start_set(tmp_path / "root", n=6, seed=2, duo_share=1.0,
                                         layout=True)
    want = {}
    checked = 0
    for s, e in zip(scenarios, m["scenarios"]):
        t = truth[s.id]
        (n1, z1, p1), (n2, z2, p2) = t["cast"]
        i1, i2 = t["identities"][n1], t["identities"][n2]
        if i1.accessory == i2.accessory or i1.colour == i2.colour:
            continue                            # a swap must change what the reader sees
        checked += 1
        s1, s2 = _swap(i1, i2)
        recol = R.Identity(i2.shape, i1.colour, i2.pattern, i2.accessory)
        frames = [([R.Placement(i1, p1, z1), R.Placement(i2, p2, z2)], "winner"),
                  ([R.Placement(s1, p1, z1), R.Placement(s2, p2, z2)], "loser"),   # swapped
                  ([R.Placement(i1, p1, z1)], "loser"),                              # one missing
                  ([R.Placement(i1, p1, z1), R.Placement(recol, p2, z2)], None)]     # colour
        want[s.id] = draw_candidates(out, e, s, t["scene"], frames)
    assert checked >= 2
    m["scenarios"] = [e for e in m["scenarios"] if e["id"] in want]
    finish_set(out, m)
    with thread_server(tmp_path / "root") as url:
        res = label_set(url, "set", truth=truth)
    assert res["labels"] == want
    assert res["appearances"] == 2 * 4 * checked
    assert res["export"]["scenarios"] == checked
    pools = load_preference_pairs(out / "pairs.jsonl")
    by_id = {s.id: s for s in scenarios}
    assert len(pools) == 2 * checked                       # one winner x two losers each
    for sid, boxes, refs in zip(pools.scenario, pools.regions, pools.references):
        assert boxes == [tuple(b) for b in by_id[sid].regions] and len(refs) == 2
