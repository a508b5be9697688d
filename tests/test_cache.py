"""ReferenceKVCache: refusals, save/load, size prediction, extend/replace, storage views."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from storyattn import GroupSharedAttention, ReferenceKVCache  # noqa: E402
from storyattn.cache import CacheSignature  # noqa: E402
from test_gsa_processor import (TINY, flux_inputs, rel_err, rows, tiny_flux,  # noqa: E402
                                zero_ref_timesteps)


def _recorded(m=None, n=2, seed=0, placement="index", **inp):
    m = m or tiny_flux()
    gsa = GroupSharedAttention(m, placement=placement)
    cache = ReferenceKVCache()
    with torch.no_grad(), gsa.record(cache):
        m(**zero_ref_timesteps(flux_inputs(n, seed=seed, **inp), range(n)))
    return m, gsa, cache


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("override,field", [
    (dict(num_layers=3), "double-stream layers"),
    (dict(num_single_layers=1), "single-stream layers"),
    (dict(num_attention_heads=3), "heads"),
    (dict(attention_head_dim=32, axes_dims_rope=(8, 12, 12)), "head dim"),
])
def test_refuses_replay_into_other_model(override, field):
    _, _, cache = _recorded()
    other = tiny_flux(**override)
    gsa = GroupSharedAttention(other)
    with pytest.raises(ValueError, match=f"recorded for another shape.*{field}"):
        gsa.replay(cache)
    with pytest.raises(ValueError, match=field):
        gsa.record(cache)  # appending from another model is refused as well


def test_refuses_token_count_mismatch():
    m, gsa, cache = _recorded()  # 4x4 = 16 image tokens
    assert cache.num_image_tokens == 16
    with gsa.replay(cache), torch.no_grad():
        with pytest.raises(ValueError, match="targets have 36 image tokens but the cached "
                                             "references 16"):
            m(**flux_inputs(1, h=6, w=6))
    # appending references of another size to a non-empty cache
    with gsa.record(cache), torch.no_grad():
        with pytest.raises(ValueError, match="image tokens per reference: cache 16 vs model 36"):
            m(**zero_ref_timesteps(flux_inputs(1, h=6, w=6), [0]))
    assert len(cache) == 2
    # opt-in: targets at another resolution read the pool
    with gsa.replay(cache, strict_tokens=False), torch.no_grad():
        out = m(**flux_inputs(1, h=6, w=6)).sample
    assert out.shape == (1, 36, 16) and torch.isfinite(out).all()


def test_refuses_tampered_pool_other_dtype_and_placement():
    m, gsa, cache = _recorded()
    # a pool whose token count no longer matches the recorded signature
    cache._k[1] = cache._k[1][:, :8].contiguous()
    with pytest.raises(ValueError, match=r"cache layer 1 keys .* do not match what was recorded"):
        gsa.replay(cache)
    m2 = tiny_flux()
    gsa2 = GroupSharedAttention(m2)
    cache = ReferenceKVCache()
    with torch.no_grad(), gsa2.record(cache):
        m2(**zero_ref_timesteps(flux_inputs(2), [0, 1]))
    cache.to(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dtype: cache 'bfloat16' vs model 'float32'"):
        gsa2.replay(cache)
    cache.to(dtype=torch.float32)
    gsa2.remove()
    gsa3 = GroupSharedAttention(m2, placement="none")
    with pytest.raises(ValueError, match="placement: cache 'index' vs model 'none'"):
        gsa3.replay(cache)
    gsa3.remove()


def test_load_refuses_mismatching_file(tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, cache = _recorded()
    path = tmp_path / "c.safetensors"
    cache.save(path)
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    sig = json.loads(meta["signature"])
    sig["num_image_tokens"] = 8
    bad = dict(meta, signature=json.dumps(sig))
    save_file(tensors, tmp_path / "bad.safetensors", metadata=bad)
    with pytest.raises(ValueError, match="token count 8"):
        ReferenceKVCache.load(tmp_path / "bad.safetensors")
    save_file(tensors, tmp_path / "v9.safetensors", metadata=dict(meta, format_version="9"))
    with pytest.raises(ValueError, match="format version 9"):
        ReferenceKVCache.load(tmp_path / "v9.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a storyattn ReferenceKVCache"):
        ReferenceKVCache.load(tmp_path / "other.safetensors")


# ----------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_bit_exact(tmp_path, dtype):
    m = tiny_flux(dtype=dtype)
    m, gsa, cache = _recorded(m=m, n=3, dtype=dtype)
    path = tmp_path / "cache.safetensors"
    cache.save(path)
    back = ReferenceKVCache.load(path)
    assert len(back) == 3 and back.signature == cache.signature
    assert back.dtype == dtype and back.nbytes == cache.nbytes
    for layer in range(cache.num_layers):
        for a, b in zip(cache.layer(layer), back.layer(layer)):
            assert a.dtype == b.dtype and torch.equal(a, b)
    x = flux_inputs(2, seed=4, dtype=dtype)
    with torch.no_grad():
        with gsa.replay(cache):
            o1 = m(**x).sample
        with gsa.replay(back):
            o2 = m(**x).sample
    assert torch.equal(o1, o2)
    with pytest.raises(ValueError, match="empty"):
        ReferenceKVCache().save(tmp_path / "empty.safetensors")


# ----------------------------------------------------------------------------- sizes
def test_estimate_bytes_predicts_nbytes():
    m = tiny_flux()
    cfg = dict(m.config)
    for n, (h, w) in ((1, (4, 4)), (3, (2, 6))):
        est_model = ReferenceKVCache.estimate_bytes(m, n, h * w)
        est_cfg = ReferenceKVCache.estimate_bytes(cfg, n, h * w, torch.float32)
        gsa = GroupSharedAttention(m)
        cache = ReferenceKVCache()
        with torch.no_grad(), gsa.record(cache):
            m(**zero_ref_timesteps(flux_inputs(n, h=h, w=w), range(n)))
        gsa.remove()
        assert cache.nbytes == est_model == est_cfg
        assert cache.allocated_nbytes == cache.nbytes
        layers = TINY["num_layers"] + TINY["num_single_layers"]
        assert cache.nbytes == 2 * layers * n * h * w * 2 * 16 * 4
    # FLUX.1-dev, 3 references at 1024^2, bf16 (the sizes in docs/design.md)
    flux_dev = dict(num_layers=19, num_single_layers=38, num_attention_heads=24,
                    attention_head_dim=128)
    assert ReferenceKVCache.estimate_bytes(flux_dev, 3, 4096, torch.bfloat16) == \
        2 * 57 * 3 * 4096 * 24 * 128 * 2
    with pytest.raises(ValueError, match="dtype is required"):
        ReferenceKVCache.estimate_bytes(flux_dev, 3, 4096)


# ----------------------------------------------------------------------------- extend/replace/clear
def test_extend_replace_clear_and_views():
    m = tiny_flux()
    gsa = GroupSharedAttention(m)
    x = zero_ref_timesteps(flux_inputs(3, seed=6), range(3))
    whole = ReferenceKVCache()
    with torch.no_grad(), gsa.record(whole):
        m(**x)
    parts = ReferenceKVCache(capacity=3)
    with torch.no_grad():
        with gsa.record(parts):
            m(**rows(x, [0, 1]))
        ptr = parts._k[0].data_ptr()
        with gsa.record(parts):  # appended as entry 2, placed at index 3
            m(**rows(x, [2]))
    assert parts._k[0].data_ptr() == ptr  # reserved capacity: no re-allocation
    assert len(parts) == 3 and parts.nbytes == whole.nbytes
    for layer in range(whole.num_layers):
        for a, b in zip(parts.layer(layer), whole.layer(layer)):
            assert rel_err(a, b) <= 1e-6
            assert a.is_contiguous()
    k0, v0 = parts.layer(0)
    assert k0.data_ptr() == parts._k[0].data_ptr()  # a view of the storage, not a copy

    # replace: a new round re-uses the storage and numbers entries from 0
    with torch.no_grad(), gsa.record(parts, replace=True):
        m(**rows(x, [2]))
    assert len(parts) == 1 and parts._k[0].data_ptr() == ptr
    single = ReferenceKVCache()
    with torch.no_grad(), gsa.record(single):
        m(**rows(x, [2]))
    assert torch.equal(parts.layer(3)[0], single.layer(3)[0])
    assert not torch.equal(parts.layer(3)[0], whole.layer(3)[0][2:3])  # entry 0 vs 2 placement

    # low-level extend/replace with explicit tensors
    low = ReferenceKVCache()
    ks = [whole.layer(i)[0][:2] for i in range(whole.num_layers)]
    vs = [whole.layer(i)[1][:2] for i in range(whole.num_layers)]
    with pytest.raises(ValueError, match="signature"):
        low.extend(ks, vs)
    assert list(low.extend(ks, vs, signature=whole.signature)) == [0, 1]
    assert list(low.extend([k[:1] for k in ks], [v[:1] for v in vs])) == [2]
    assert len(low) == 3
    assert list(low.replace(ks, vs)) == [0, 1] and len(low) == 2
    bad_sig = CacheSignature(**{**whole.signature.__dict__, "num_heads": 4})
    with pytest.raises(ValueError, match="differs"):
        low.extend(ks, vs, signature=bad_sig)

    parts.clear()
    assert len(parts) == 0 and parts.nbytes == 0 and parts.allocated_nbytes == 0
    with pytest.raises(ValueError, match="empty"):
        gsa.replay(parts)


def test_failed_record_forward_leaves_cache_unchanged():
    m, gsa, cache = _recorded(n=2)
    before = [t.clone() for t in cache.layer(0)]

    def boom(*a, **k):
        raise RuntimeError("boom")

    h = m.single_transformer_blocks[0].register_forward_pre_hook(boom)
    with gsa.record(cache), torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
        m(**zero_ref_timesteps(flux_inputs(1), [0]))
    h.remove()
    assert len(cache) == 2
    assert all(torch.equal(a, b) for a, b in zip(before, cache.layer(0)))
