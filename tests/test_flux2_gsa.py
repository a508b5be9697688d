"""Group-Shared Attention on FLUX.2 [klein] against diffusers' own KV pipeline.

The reference is ``Flux2KleinKVPipeline(image=refs)``: at step 0 the references' K/V are
extracted (reference tokens attend only to each other, at timestep 0) and every later
step joins them between the text and image keys.  storyattn does the same with one
pool and no per-step concatenation: ``record_images(pipe, refs, joint=True)``, then a
call without ``image`` inside ``gsa.replay(cache)``.  Same weights, seed and steps, fp32.
"""
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from storyattn import GroupSharedAttention, ReferenceKVCache, available_backends  # noqa: E402

TOL = 1 / 255
STEPS = 2


@pytest.fixture(scope="module")
def pipes():
    from diffusers import Flux2KleinKVPipeline, Flux2KleinPipeline

    from pipelines.tiny import get_tiny_flux2

    kv = Flux2KleinKVPipeline.from_pretrained(get_tiny_flux2(), torch_dtype=torch.float32)
    kv.set_progress_bar_config(disable=True)
    # the klein pipeline on the very same modules (the KV processors stay installed)
    klein = Flux2KleinPipeline(scheduler=kv.scheduler, vae=kv.vae, text_encoder=kv.text_encoder,
                               tokenizer=kv.tokenizer, transformer=kv.transformer,
                               is_distilled=True)
    klein.set_progress_bar_config(disable=True)
    return kv, klein


@pytest.fixture(scope="module")
def refs():
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]


def _call(pipe, prompt, **kw):
    args = dict(prompt=prompt, height=64, width=64, num_inference_steps=STEPS,
                max_sequence_length=32, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw)
    if type(pipe).__name__ == "Flux2KleinPipeline":
        args["guidance_scale"] = 1.0
    return pipe(**args).images


CASES = {
    "1ref": (1, "a red fox in the snow"),
    "2refs": (2, "a red fox in the snow"),
    "3prompts_2refs": (2, ["a fox", "a red fox in snow", "the fox sleeps by the fire"]),
}


_MEMO = {}


def _kv_reference(kv, refs, case):
    """Flux2KleinKVPipeline(image=refs) and the same call without references, once per case."""
    if case not in _MEMO:
        n, prompt = CASES[case]
        _MEMO[case] = (_call(kv, prompt, image=refs[:n]), _call(kv, prompt))
    return _MEMO[case]


# each case through the KV pipeline, and the klein pipeline on the two-reference case, by
# default; the other klein calls are slow on a 2-core CPU (--runslow)
@pytest.mark.parametrize("caller,case", [
    (caller, case) if caller == "kv_without_image" or case == "2refs"
    else pytest.param(caller, case, marks=pytest.mark.slow)
    for case in CASES for caller in ("kv_without_image", "klein_guidance_1")])
def test_replay_equals_flux2_klein_kv_pipeline(pipes, refs, case, caller):
    kv, klein = pipes
    n, prompt = CASES[case]
    want, plain = _kv_reference(kv, refs, case)
    gsa = GroupSharedAttention(kv.transformer)
    try:
        cache = gsa.record_images(kv, refs[:n], joint=True)
        assert len(cache) == n and cache.num_image_tokens == 64
        with gsa.replay(cache):
            got = _call(kv if caller == "kv_without_image" else klein, prompt)
    finally:
        gsa.remove()
    err = float(np.abs(got - want).max())
    print(f"\n[flux2 equality] {case} via {caller}: max |storyattn - Flux2KleinKVPipeline| = "
          f"{err:.3g} (no references: {float(np.abs(plain - want).max()):.3g})")
    assert got.shape == want.shape
    assert err <= TOL
    assert float(np.abs(plain - want).max()) > TOL  # the references change the images


def test_handle_type_and_processors(pipes):
    from storyattn.flux2 import Flux2GroupSharedAttention
    from storyattn.processors.flux2_gsa import (GroupSharedFlux2AttnProcessor,
                                                GroupSharedFlux2ParallelAttnProcessor)

    kv, _ = pipes
    tr = kv.transformer
    gsa = GroupSharedAttention(tr)
    try:
        assert isinstance(gsa, Flux2GroupSharedAttention)
        assert (gsa.num_double_layers, gsa.num_single_layers) == (2, 2)
        assert [type(b.attn.processor) for b in tr.transformer_blocks] == \
            [GroupSharedFlux2AttnProcessor] * 2
        assert [type(b.attn.processor) for b in tr.single_transformer_blocks] == \
            [GroupSharedFlux2ParallelAttnProcessor] * 2
        assert all(b.attn.processor.kv for b in tr.transformer_blocks)  # KV pipeline's
        with pytest.raises(RuntimeError, match="already runs"):
            GroupSharedAttention(tr)
    finally:
        gsa.remove()
    assert type(tr.transformer_blocks[0].attn.processor).__name__ == "Flux2KVAttnProcessor"


def _tokens(pipe, images):
    from storyattn.flux2 import encode_flux2_latents

    px = torch.cat([pipe.image_processor.preprocess(im, height=64, width=64) for im in images])
    return encode_flux2_latents(pipe.vae, px)


def test_latents_and_ids_equal_the_pipeline(pipes, refs):
    """FLUX.2 VAE encode + 2x2 patchify + batch-norm normalisation + packing, and the
    reference position ids, against the pipeline's own helpers."""
    from storyattn.flux2 import flux2_image_ids

    kv, _ = pipes
    px = [kv.image_processor.preprocess(im, height=64, width=64) for im in refs]
    lat, ids = kv.prepare_image_latents(px, 1, None, "cpu", torch.float32)
    ours = _tokens(kv, refs)
    assert torch.allclose(ours.reshape(1, -1, ours.shape[-1]), lat, atol=1e-5)
    want = torch.cat([flux2_image_ids(8, 8, t=10 * (i + 1)) for i in range(2)])
    assert torch.equal(ids[0].float(), want)
    assert torch.equal(flux2_image_ids(8, 8), kv._prepare_latent_ids(torch.zeros(1, 1, 8, 8))[0].float())


def _replay(tr, gsa, cache, x, ref_index=None):
    with torch.no_grad(), gsa.replay(cache, ref_index=ref_index):
        return tr(**x)[0]


def test_pool_recording_and_subsets(pipes, refs):
    """Default (pool) recording: each image alone.  One image: the same entry as joint.
    Two: entries differ from the joint group's (there the images saw each other), and a
    target reading entry 0 through ref_index equals a target reading a cache of that
    image alone, next to a target reading both, in one batch."""
    kv, _ = pipes
    tr = kv.transformer
    gsa = GroupSharedAttention(tr)
    try:
        pool = gsa.record_images(kv, refs)
        joint = gsa.record_images(kv, refs, joint=True)
        single = gsa.record_images(kv, refs[:1], joint=True)
        assert len(pool) == len(joint) == 2 and pool.signature == joint.signature
        for layer in range(pool.num_layers):
            k_pool, _ = pool.layer(layer)
            assert torch.allclose(k_pool[:1], single.layer(layer)[0], atol=1e-5)
        assert (pool.layer(3)[0] - joint.layer(3)[0]).abs().max() > 1e-3
        x = _transformer_inputs(tr, 2, n_img=64, seed=4)
        x["hidden_states"][1] = x["hidden_states"][0]
        x["encoder_hidden_states"][1] = x["encoder_hidden_states"][0]
        sub = _replay(tr, gsa, pool, x, torch.tensor([[0, -1], [0, 1]]))
        alone = _replay(tr, gsa, single, x)
        assert (sub[0] - alone[0]).abs().max() <= 1e-5
        assert (sub[1] - alone[1]).abs().max() > 1e-3
        assert (sub[1] - _replay(tr, gsa, pool, x)[1]).abs().max() <= 1e-5
    finally:
        gsa.remove()


def _transformer_inputs(tr, batch, n_img=16, n_txt=5, seed=0, t=0.7):
    g = torch.Generator().manual_seed(seed)
    side = int(n_img ** 0.5)
    from storyattn.flux2 import flux2_image_ids

    return dict(hidden_states=torch.randn(batch, n_img, tr.config.in_channels, generator=g),
                encoder_hidden_states=torch.randn(batch, n_txt, tr.config.joint_attention_dim,
                                                  generator=g),
                timestep=torch.full((batch,), t), img_ids=flux2_image_ids(side, side),
                txt_ids=torch.stack([torch.zeros(n_txt)] * 3 + [torch.arange(n_txt).float()], -1),
                guidance=None, return_dict=False)


def _rows(x, idx):
    out = dict(x)
    for key in ("hidden_states", "encoder_hidden_states", "timestep"):
        out[key] = x[key][idx]
    return out


@pytest.mark.parametrize("backend", [pytest.param(b, marks=[] if b == "torch" else pytest.mark.slow)
                                     for b in available_backends()])
def test_in_batch_equals_record_then_replay(pipes, backend):
    """in_batch (training) with groups [target, reference] equals recording the references
    (same text, timestep 0) and replaying the targets; gradients reach the references."""
    kv, _ = pipes
    tr = kv.transformer
    x = _transformer_inputs(tr, 4, seed=3)
    x["timestep"] = torch.tensor([0.7, 0.0, 0.4, 0.0])  # rows 1 and 3 are references
    gsa = GroupSharedAttention(tr, backend=backend)
    try:
        with torch.no_grad():
            cache = ReferenceKVCache()
            with gsa.record(cache):
                tr(**_rows(x, [1]))
            with gsa.replay(cache):
                want0 = tr(**_rows(x, [0]))[0]
            cache2 = ReferenceKVCache()
            with gsa.record(cache2):
                tr(**_rows(x, [3]))
            with gsa.replay(cache2):
                want2 = tr(**_rows(x, [2]))[0]
            stock = tr(**_rows(x, [0]))[0]
        hs = x["hidden_states"].clone().requires_grad_(True)
        with gsa.in_batch(group_size=2, num_targets=1):
            out = tr(**{**x, "hidden_states": hs})[0]
        assert (out[0] - want0[0]).abs().max() <= 1e-5
        assert (out[2] - want2[0]).abs().max() <= 1e-5
        assert (out[0] - stock[0]).abs().max() > 1e-4
        out[[0, 2]].square().sum().backward()
        assert hs.grad[1].abs().sum() > 0 and hs.grad[3].abs().sum() > 0
    finally:
        gsa.remove()


@pytest.mark.slow
def test_fused_rope_cache_write_equals_torch(pipes, refs):
    """record/replay with the fused qk-norm + RoPE + cache-write kernel (triton; on the CPU
    through the interpreter) equals the torch path."""
    pytest.importorskip("triton")
    kv, _ = pipes
    caches, outs = [], []
    for rope in ("torch", "triton"):
        gsa = GroupSharedAttention(kv.transformer, rope_backend=rope)
        try:
            caches.append(gsa.record_images(kv, refs))
            x = _transformer_inputs(kv.transformer, 1, n_img=64, seed=5)
            with torch.no_grad(), gsa.replay(caches[-1]):
                outs.append(kv.transformer(**x)[0])
        finally:
            gsa.remove()
    for layer in range(caches[0].num_layers):
        for a, b in zip(caches[0].layer(layer), caches[1].layer(layer)):
            assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_misuse_is_refused(pipes, refs):
    from diffusers import FluxPipeline

    from pipelines.tiny import get_tiny_flux

    kv, _ = pipes
    gsa = GroupSharedAttention(kv.transformer)
    try:
        cache = gsa.record_images(kv, refs[:1])
        with pytest.raises(ValueError, match="attend to no text"):
            gsa.record_images(kv, refs[:1], prompts="a fox")
        with pytest.raises(ValueError, match="call the pipeline without image="):
            with gsa.replay(cache, strict_tokens=False):
                _call(kv, "a fox", image=refs[:1])
        with pytest.raises(ValueError, match="come to sizes"):
            from PIL import Image
            gsa.record_images(kv, [refs[0], Image.new("RGB", (128, 64))])
        flux1 = FluxPipeline.from_pretrained(get_tiny_flux())
        g1 = GroupSharedAttention(flux1.transformer)
        try:
            c1 = g1.record_images(flux1, refs[:1], max_sequence_length=32)
            with pytest.raises(ValueError, match=r"recorded from a FLUX.1 model; a FLUX.2"):
                gsa.replay(c1)
            with pytest.raises(ValueError, match=r"placement: cache 'flux2:index' vs model 'index'"):
                g1.replay(cache)
        finally:
            g1.remove()
    finally:
        gsa.remove()


def test_record_images_accepts_tensors_and_arrays(pipes, refs):
    """A [3, H, W] tensor in [0, 1] and an HWC float array give the PIL image's entry."""
    kv, _ = pipes
    arr = np.array(refs[0])  # a writable copy
    gsa = GroupSharedAttention(kv.transformer)
    try:
        want = gsa.record_images(kv, refs[:1])
        for im in (torch.from_numpy(arr).permute(2, 0, 1).float() / 255,
                   [arr.astype(np.float32) / 255]):
            got = gsa.record_images(kv, im)
            assert len(got) == 1 and got.signature == want.signature
            for layer in range(want.num_layers):
                assert torch.allclose(got.layer(layer)[0], want.layer(layer)[0], atol=1e-4)
    finally:
        gsa.remove()
