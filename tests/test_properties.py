"""Property-based tests (hypothesis).

* ``segment_attention`` against the independent float64 reference of
  ``tests/_reference.py`` over random shapes, scales and page tables (duplicates,
  ``-1``, empty rows, ``P = 0``): the ``torch`` backend (forward in float32 and float64,
  all five gradients in float64), and the fused ``triton`` kernels under the
  interpreter at tiny sizes with few examples.
* The story parser: any JSON document either parses into a story or raises
  ``StoryError``, never anything else; the same for any bytes in a story file.
"""
from __future__ import annotations

import json

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from _reference import segment_attention_ref  # noqa: E402
from conftest import triton_interpret_enabled  # noqa: E402
from storyattn import segment_attention  # noqa: E402

_FAST = settings(deadline=None, derandomize=True, database=None, max_examples=40,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def problems(draw, max_len=9, head_dims=(1, 4, 8, 16, 24)):
    """Random segment-attention inputs: shapes, a pool of P >= 0 entries and a page
    table (None, or rows with duplicates and -1)."""
    B = draw(st.integers(1, 3))
    Lq, Lk, Lr = (draw(st.integers(1, max_len)) for _ in range(3))
    H = draw(st.integers(1, 3))
    D = draw(st.sampled_from(head_dims))
    P = draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    index = None
    if draw(st.booleans()):
        R = draw(st.integers(0, 4))
        index = torch.tensor(draw(st.lists(st.lists(st.integers(-1, P - 1), min_size=R, max_size=R),
                                           min_size=B, max_size=B)),
                             dtype=torch.long).reshape(B, R)
    scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
    g = torch.Generator().manual_seed(seed)
    # mean-shifted keys give peaked, uneven softmax rows, not near-uniform ones
    q = torch.randn(B, Lq, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Lk, H, D, generator=g, dtype=torch.float64) + 0.5
    v = torch.randn(B, Lk, H, D, generator=g, dtype=torch.float64)
    rk = torch.randn(P, Lr, H, D, generator=g, dtype=torch.float64) - 0.5
    rv = torch.randn(P, Lr, H, D, generator=g, dtype=torch.float64)
    return q, k, v, rk, rv, index, scale


def _check(prob, dtype, backend, atol):
    q, k, v, rk, rv, index, scale = prob
    ins = [t.to(dtype) for t in (q, k, v, rk, rv)]
    out, lse = segment_attention(*ins, ref_index=index, scale=scale, return_lse=True,
                                 backend=backend)
    ref_out, ref_lse = segment_attention_ref(*ins, ref_index=index, scale=scale)
    assert out.dtype == dtype and out.shape == q.shape
    # the public lse is float32 whatever the input dtype
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert (out.double() - ref_out).abs().max() <= atol
    assert ((lse.double() - ref_lse).abs() <= 2e-5 + 1e-6 * ref_lse.abs()).all()


@_FAST
@given(problems())
def test_torch_backend_matches_float64_reference(prob):
    _check(prob, torch.float32, "torch", 2e-5)
    _check(prob, torch.float64, "torch", 1e-10)


@settings(_FAST, max_examples=25)
@given(problems(max_len=5, head_dims=(2, 8)))
def test_torch_backend_gradients_match_reference(prob):
    q, k, v, rk, rv, index, scale = prob
    ins = [t.clone().requires_grad_(True) for t in (q, k, v, rk, rv)]
    refs = [t.clone().requires_grad_(True) for t in (q, k, v, rk, rv)]
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = segment_attention(*ins, ref_index=index, scale=scale, backend="torch")
    ref_out, _ = segment_attention_ref(*refs, ref_index=index, scale=scale)
    (out * w).sum().backward()
    (ref_out * w).sum().backward()
    for name, a, b in zip(("q", "k", "v", "ref_k", "ref_v"), ins, refs):
        ga = torch.zeros_like(a) if a.grad is None else a.grad
        gb = torch.zeros_like(b) if b.grad is None else b.grad
        assert ga.shape == a.shape and torch.allclose(ga, gb, rtol=0, atol=1e-10), f"d{name}"


def _triton_usable():
    if not torch.cuda.is_available() and not triton_interpret_enabled():
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _triton_usable(), reason="triton not importable, or no GPU and no "
                                                  "TRITON_INTERPRET=1")
@settings(_FAST, max_examples=6)
@given(problems(max_len=4, head_dims=(4, 16)))
def test_triton_backend_matches_float64_reference(prob):
    """Interpreted on CPU (about a second an example): tiny sizes, few examples."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v, rk, rv, index, scale = prob
    moved = [t.to(dev) for t in (q, k, v, rk, rv)]
    _check((*moved, None if index is None else index.to(dev), scale), torch.float32, "triton",
           2e-5)


# ----------------------------------------------------------------------------- story parser
_STORY_KEYS = ["title", "style", "characters", "frames", "name", "description",
               "reference_images", "prompt", "Fox", "x"]
_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                     st.text(max_size=12), st.sampled_from(["Fox", "a.png", "", " ", "b.jpg"]))
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.sampled_from(_STORY_KEYS),
                                                      st.text(max_size=6)), inner, max_size=5)),
    max_leaves=25)


@st.composite
def story_like(draw):
    """JSON documents near the story format (so the deep branches are reached too)."""
    chars = draw(st.lists(st.one_of(
        st.fixed_dictionaries({"name": st.one_of(st.sampled_from(["Fox", "Owl", ""]), _json)},
                              optional={"description": _json, "reference_images": _json,
                                        "extra": _json}),
        _json), max_size=3))
    frames = draw(st.one_of(_json, st.lists(st.one_of(
        st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=10), _json)},
                              optional={"characters": st.one_of(
                                  st.lists(st.sampled_from(["Fox", "Owl", "Foxx"]), max_size=3),
                                  _json)}),
        st.text(max_size=10), _json), max_size=4)))
    doc = {"characters": chars, "frames": frames}
    for key in ("title", "style"):
        if draw(st.booleans()):
            doc[key] = draw(st.one_of(st.text(max_size=10), _json))
    return doc


@_FAST
@given(st.one_of(_json, story_like()))
def test_story_parser_parses_or_raises_story_error(tmp_path, obj):
    from pipelines.story import Story, StoryError, parse_story

    try:
        story = parse_story(obj, base_dir=tmp_path)
    except StoryError as e:
        assert e.errors and all(isinstance(m, str) and m for m in e.errors)
        return
    assert isinstance(story, Story) and story.frames
    json.dumps(story.to_json())  # what parsed can be written back


@_FAST
@given(st.one_of(st.binary(max_size=64),
                 st.builds(lambda o: json.dumps(o).encode(), story_like()),
                 st.sampled_from([b"[" * 100000, b"\xff\xfe{}", b'{"frames": ["a"]}'])))
def test_story_file_loader_parses_or_raises_story_error(tmp_path, data):
    from pipelines.story import StoryError, load_story

    f = tmp_path / "story.json"
    f.write_bytes(data)
    try:
        load_story(f)
    except StoryError:
        pass


def test_story_parser_edge_cases_are_story_errors(tmp_path):
    """Found by the properties above: paths the OS refuses to look up."""
    from pipelines.story import StoryError, parse_story

    for bad in ("x" * 5000 + ".png", "a\x00b.png"):
        with pytest.raises(StoryError, match=r"characters\[0\]\.reference_images\[0\]"):
            parse_story({"characters": [{"name": "A", "reference_images": [bad]}],
                         "frames": ["p"]}, base_dir=tmp_path)
