"""Drop-in as diffusers defines it: with storyattn's processors installed and no round or
mode open, diffusers' own features behave exactly as they do without them.

* SDXL + IP-Adapter with GRCA installed: ``pipe.set_ip_adapter_scale`` (0.0, per-adapter
  lists, per-layer dicts), ``ip_adapter_masks``, two adapters at once and FaceID-style
  multi-token image embeddings give bit-identical UNet outputs to diffusers' stock
  ``IPAdapterAttnProcessor2_0`` (the installed processor hands those calls to it);
  ``pipe.unload_ip_adapter()`` works; a second ``pipe.load_ip_adapter`` leaves the handle
  refusing to open a round, with the way to reinstall.
* FLUX with GSA installed: a compiled transformer (``fullgraph=True``) never recompiles
  between calls (no mode, replay, in-batch, record: appending to a cache, a new cache,
  ``record_images``), and records caches bit-equal to eager; called inside a larger
  compiled function it still gives one graph (no mode, in-batch); diffusers' FLUX
  IP-Adapter unloader, which re-creates every processor with no arguments, leaves the
  modes refusing with the way to reinstall, and ``remove()`` gives back a working stock
  model.
"""
import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounter

pytest.importorskip("diffusers")

from storyattn import GroupSharedAttention, ReferenceKVCache  # noqa: E402
from storyattn.grca import install_global_reference_attention  # noqa: E402
from storyattn.processors.grca import GlobalReferenceAttnProcessor  # noqa: E402

# ----------------------------------------------------------------------------- SDXL


def _load_pipe(n_adapters: int):
    from diffusers import StableDiffusionXLPipeline

    from pipelines.tiny import get_tiny_sdxl, sdxl_ip_adapter_kwargs

    path = get_tiny_sdxl()
    pipe = StableDiffusionXLPipeline.from_pretrained(path, torch_dtype=torch.float32)
    kw = sdxl_ip_adapter_kwargs(path)
    if n_adapters > 1:
        for key in ("pretrained_model_name_or_path_or_dict", "subfolder", "weight_name"):
            kw[key] = [kw[key]] * n_adapters
    pipe.load_ip_adapter(**kw)
    pipe.set_progress_bar_config(disable=True)
    if n_adapters > 1:  # the same file twice: make the second adapter's weights differ
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for proc in pipe.unet.attn_processors.values():
                for lin in getattr(proc, "to_k_ip", [])[1:]:
                    lin.weight.add_(0.5 * torch.randn(lin.weight.shape, generator=g))
    return pipe


@pytest.fixture(scope="module")
def pipe2():
    """Tiny SDXL with two IP-Adapters loaded."""
    return _load_pipe(2)


def _unet_inputs(unet, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, unet.config.in_channels, 8, 8, generator=g),
        timestep=torch.tensor(400),
        encoder_hidden_states=torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1)},
    )


def _image_embeds(n_adapters, dim, batch=2, n_images=1, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n_images, dim, generator=g) for _ in range(n_adapters)]


def _run(unet, x, embeds, masks=None):
    kw = dict(x)
    kw["added_cond_kwargs"] = {**x["added_cond_kwargs"], "image_embeds": embeds}
    if masks is not None:
        kw["cross_attention_kwargs"] = {"ip_adapter_masks": masks}
    with torch.no_grad():
        return unet(**kw).sample


def _stock_and_ours(pipe, run, scale):
    """``run()`` under diffusers' stock processors and under installed GRCA, each after
    ``pipe.set_ip_adapter_scale(scale)`` (set after installing: the setter must reach us)."""
    pipe.set_ip_adapter_scale(scale)
    ref = run()
    handle = install_global_reference_attention(pipe.unet)
    try:
        pipe.set_ip_adapter_scale([0.25, 0.25])  # overwritten next: the last setter call counts
        pipe.set_ip_adapter_scale(scale)
        ours = run()
    finally:
        handle.remove()
    return ours, ref


# with two adapters loaded diffusers wants one entry per adapter
SCALES = {
    "zero": [0.0, 0.0],
    "first_off": [0.0, 0.9],
    "per_adapter": [0.3, 0.9],
    "per_layer": [{"down": {"block_1": 0.8}, "up": {"block_0": [0.0, 1.0]}}, 0.5],
}


def test_scale_setter_bit_identical_outside_round(pipe2):
    unet = pipe2.unet
    x = _unet_inputs(unet)
    emb = _image_embeds(2, pipe2.image_encoder.config.projection_dim)
    outs = {}
    for label, scale in SCALES.items():
        ours, ref = _stock_and_ours(pipe2, lambda: _run(unet, x, emb), scale)
        assert torch.equal(ours, ref), f"scale {label}: GRCA installed != stock"
        outs[label] = ours
    # the cases differ from each other, so the setter is really what is being compared
    labels = list(outs)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            assert not torch.equal(outs[a], outs[b]), (a, b)


def test_masks_bit_identical_outside_round(pipe2):
    from diffusers.image_processor import IPAdapterMaskProcessor
    from PIL import Image

    unet = pipe2.unet
    x = _unet_inputs(unet, seed=3)
    emb = _image_embeds(2, pipe2.image_encoder.config.projection_dim, seed=4)
    left = np.zeros((64, 64), dtype=np.uint8)
    left[:, :32] = 255
    masks = IPAdapterMaskProcessor().preprocess(
        [Image.fromarray(left), Image.fromarray(255 - left)], height=64, width=64)
    masks = [masks[:1], masks[1:]]  # one [1, 1, H, W] mask per adapter
    ours, ref = _stock_and_ours(pipe2, lambda: _run(unet, x, emb, masks), [0.6, 0.8])
    assert torch.equal(ours, ref)
    ours_unmasked, _ = _stock_and_ours(pipe2, lambda: _run(unet, x, emb), [0.6, 0.8])
    assert not torch.equal(ours, ours_unmasked)  # the masks took effect


def test_faceid_multi_token_embeddings_bit_identical():
    """An IP-Adapter FaceID (ID embedding -> 4 tokens through its own projection), loaded
    the way diffusers' own FaceID test does, several images per row."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import IPAdapterFaceIDImageProjection
    from safetensors.torch import load_file

    from pipelines.tiny import SDXL_IP_ADAPTER_SUBFOLDER, SDXL_IP_ADAPTER_WEIGHT_NAME, get_tiny_sdxl

    path = get_tiny_sdxl()
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval()
    flat = load_file(f"{path}/{SDXL_IP_ADAPTER_SUBFOLDER}/{SDXL_IP_ADAPTER_WEIGHT_NAME}")
    C, E = unet.config.cross_attention_dim, 24
    torch.manual_seed(0)
    proj = IPAdapterFaceIDImageProjection(cross_attention_dim=C, image_embed_dim=E, mult=2,
                                          num_tokens=4)
    image_proj = {k.replace("ff.net.0.proj", "proj.0").replace("ff.net.2", "proj.2"): v
                  for k, v in proj.state_dict().items()}
    ip = {k[len("ip_adapter."):]: v for k, v in flat.items() if k.startswith("ip_adapter.")}
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": ip}])
    x = _unet_inputs(unet, seed=5)
    emb = _image_embeds(1, E, n_images=3, seed=6)

    ref = _run(unet, x, emb)
    handle = install_global_reference_attention(unet)
    try:
        ours = _run(unet, x, emb)
    finally:
        handle.remove()
    assert torch.equal(ours, ref)
    zero = [torch.zeros_like(emb[0])]
    assert not torch.equal(ref, _run(unet, x, zero))  # the ID embeddings matter


def test_unload_and_reload_with_grca_installed():
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

    from pipelines.tiny import get_tiny_sdxl, sdxl_ip_adapter_kwargs

    pipe = _load_pipe(1)
    emb = torch.randn(2, pipe.image_encoder.config.projection_dim)
    kw = dict(prompt="a fox", num_inference_steps=1, height=64, width=64, output_type="latent")

    # unload with GRCA installed: the whole pipeline goes back to plain SDXL
    handle = install_global_reference_attention(pipe.unet)
    pipe.unload_ip_adapter()
    assert pipe.unet.encoder_hid_proj is None
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {AttnProcessor2_0}
    with pytest.raises(RuntimeError, match=r"no longer run .*call handle.remove\(\), then "
                                           r"install_global_reference_attention"):
        with handle.references(emb, scale=0.5):
            pass
    handle.remove()  # keeps the processors diffusers put there
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {AttnProcessor2_0}
    assert torch.isfinite(pipe(**kw).images).all()  # plain SDXL runs (no image prompt)

    # a second load_ip_adapter replaces GRCA's processors: the stale handle refuses
    path = get_tiny_sdxl()
    pipe.load_ip_adapter(**sdxl_ip_adapter_kwargs(path))
    handle = install_global_reference_attention(pipe.unet)
    pipe.load_ip_adapter(**sdxl_ip_adapter_kwargs(path))
    cross = {n: p for n, p in pipe.unet.attn_processors.items() if "attn2" in n}
    assert {type(p) for p in cross.values()} == {IPAdapterAttnProcessor2_0}
    with pytest.raises(RuntimeError, match=r"7 of 7 cross-attention layers .*no longer run"):
        with handle.references(emb, scale=0.5):
            pass
    handle.remove()
    assert {n: p for n, p in pipe.unet.attn_processors.items() if "attn2" in n} == cross
    handle = install_global_reference_attention(pipe.unet)  # reinstalling works
    try:
        assert all(isinstance(p, GlobalReferenceAttnProcessor) for n, p in
                   pipe.unet.attn_processors.items() if "attn2" in n)
        with handle.references(emb, scale=0.5) as st:
            assert st.active and st.num_refs == 2
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- FLUX


def test_compiled_flux_with_gsa_never_recompiles():
    """diffusers' test_torch_compile_recompilation_and_graph_break, with GSA installed:
    fullgraph=True, two calls under error_on_recompile; then the same in replay (two
    different caches, with and without ref_index) and in-batch mode."""
    from test_gsa_processor import flux_inputs, record_refs, rel_err, tiny_flux, zero_ref_timesteps

    torch._dynamo.reset()
    m = tiny_flux()
    gsa = GroupSharedAttention(m)
    x = flux_inputs(2, seed=8)
    refs = zero_ref_timesteps(flux_inputs(3, seed=9), [0, 1, 2])
    no_recompile = torch._dynamo.config.patch(error_on_recompile=True)
    # dynamo's guards decide recompiles, whatever the backend: eager keeps it CPU-fast
    cm = torch.compile(m, backend="eager", fullgraph=True)
    try:
        with torch.no_grad():
            with no_recompile:
                assert torch.equal(cm(**x).sample, cm(**x).sample)
            caches = [record_refs(gsa, m, refs, [0, 1, 2]), record_refs(gsa, m, refs, [2, 0, 1])]
            for ri in (None, torch.tensor([[0, 2], [1, -1]])):
                with gsa.replay(caches[0], ref_index=ri):
                    eager = m(**x).sample
                    first = cm(**x).sample  # compiles this mode
                assert rel_err(first, eager) <= 1e-5
                with no_recompile:
                    for cache in caches:
                        with gsa.replay(cache, ref_index=ri):
                            cm(**x)
                            cm(**x)
            xi = flux_inputs(4, seed=3)
            with gsa.in_batch(2, 1):
                cm(**xi)
            with no_recompile:
                for _ in range(2):
                    with gsa.in_batch(2, 1):
                        cm(**xi)
                assert torch.equal(cm(**x).sample, m(**x).sample)  # back to no mode
    finally:
        gsa.remove()
        torch._dynamo.reset()


def test_compiled_flux_record_never_recompiles():
    """Record mode compiled with fullgraph=True: after the first record call compiles,
    appending to a cache (new entry numbers, storage growth), recording into a new cache
    and starting one over never recompile, and every cache equals the eager recording
    bit for bit."""
    from test_gsa_processor import flux_inputs, rows, tiny_flux, zero_ref_timesteps
    from test_record_images import _assert_same

    torch._dynamo.reset()
    m = tiny_flux()
    gsa = GroupSharedAttention(m)
    x = zero_ref_timesteps(flux_inputs(6, seed=9), range(6))
    parts = [rows(x, [0, 1]), rows(x, [2, 3]), rows(x, [4, 5])]

    def record(model):
        grown, reserved = ReferenceKVCache(), ReferenceKVCache(capacity=5)
        for cache in (grown, reserved):
            for part in parts:  # entries 0-1, then 2-3, then 4-5 of the same cache
                with gsa.record(cache):
                    model(**part)
        again = ReferenceKVCache()
        with gsa.record(again):
            model(**parts[2])
        with gsa.record(again, replace=True):  # a new round in the same storage
            model(**parts[0])
        return grown, reserved, again

    counter = CompileCounter()  # runs each graph eagerly and counts them
    cm = torch.compile(m, backend=counter, fullgraph=True)
    try:
        with torch.no_grad():
            eager = record(m)
            with torch._dynamo.config.patch(error_on_recompile=True):
                compiled = record(cm)
        assert counter.frame_count == 1 and counter.op_count > 100  # the whole forward
    finally:
        gsa.remove()
        torch._dynamo.reset()
    for e, c in zip(eager, compiled):
        _assert_same(c, e)
    grown, reserved, again = compiled
    assert len(grown) == 6 and grown.capacity == 6 and reserved.capacity == 5 + 1
    k = grown.layer(0)[0]
    assert torch.equal(again.layer(0)[0], k[:2])  # same rows at the same entry numbers
    assert not torch.equal(k[:2], k[2:4])  # the entries hold different references


def test_flux_called_inside_a_compiled_function_stays_one_graph():
    """GSA's hooks run eagerly only where dynamo meets them as frames of their own
    (torch.compile(transformer)); inside a larger compiled function they are traced
    with the rest, so no mode and in-batch still give one graph."""
    from test_gsa_processor import flux_inputs, tiny_flux

    m = tiny_flux()
    gsa = GroupSharedAttention(m)
    x = flux_inputs(2, seed=1)

    def step(inputs):
        return m(**inputs).sample * 2

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            for mode in (None, (2, 1)):
                counter = CompileCounter()
                compiled = torch.compile(step, backend=counter, fullgraph=True)
                torch._dynamo.reset()
                if mode is None:
                    got, want = compiled(x), step(x)
                else:
                    with gsa.in_batch(*mode):
                        got, want = compiled(x), step(x)
                assert torch.equal(got, want) and counter.frame_count == 1
    finally:
        gsa.remove()
        torch._dynamo.reset()


def test_compiled_flux_record_images_never_recompiles():
    """gsa.record_images on a pipeline whose transformer is compiled (fullgraph=True):
    two batches, then a second call into a new cache, with no recompile after the first
    forward; the cache equals eager record_images bit for bit."""
    from diffusers import FluxPipeline
    from PIL import Image

    from pipelines.tiny import get_tiny_flux
    from test_record_images import _assert_same

    pipe = FluxPipeline.from_pretrained(get_tiny_flux())
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
              for _ in range(4)]
    prompts = ["a fox", "a red fox", "a fox in snow", "a fox at night"]
    kw = dict(batch_size=2, max_sequence_length=32)
    gsa = GroupSharedAttention(pipe.transformer)
    torch._dynamo.reset()
    try:
        eager = gsa.record_images(pipe, images, prompts, **kw)
        counter = CompileCounter()
        pipe.transformer = torch.compile(pipe.transformer, backend=counter, fullgraph=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            first = gsa.record_images(pipe, images, prompts, **kw)
            second = gsa.record_images(pipe, images[2:], prompts[2:], **kw)
        assert counter.frame_count == 1
    finally:
        pipe.transformer = getattr(pipe.transformer, "_orig_mod", pipe.transformer)
        gsa.remove()
        torch._dynamo.reset()
    _assert_same(first, eager)
    assert len(second) == 2
    # images 2-3 recorded as entries 0-1 are placed differently from entries 2-3
    assert not torch.equal(second.layer(0)[0], eager.layer(0)[0][2:])


def test_flux_ip_adapter_unloader_recreated_processors_are_refused():
    """diffusers' FLUX unload_ip_adapter re-creates every non-IP processor as
    ``type(p)()`` (layer_index 0): the modes refuse and say how to reinstall; remove()
    then gives back stock processors and a new install works."""
    from types import SimpleNamespace

    from diffusers.loaders.ip_adapter import FluxIPAdapterMixin
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    from test_gsa_processor import flux_inputs, tiny_flux

    m = tiny_flux()
    x = flux_inputs(2, seed=1)
    with torch.no_grad():
        stock = m(**x).sample
    gsa = GroupSharedAttention(m)
    FluxIPAdapterMixin.unload_ip_adapter(SimpleNamespace(transformer=m))
    assert all(type(p).__name__ == "GroupSharedFluxAttnProcessor" and p.layer_index == 0
               for p in m.attn_processors.values())
    msg = r"attention layers \[0, 1, 2, 3\] no longer run .*gsa.remove\(\), then GroupSharedAttention"
    with pytest.raises(RuntimeError, match=msg):
        with gsa.record(ReferenceKVCache()):
            pass
    with pytest.raises(RuntimeError, match=msg):
        with gsa.in_batch(2, 1):
            pass
    gsa.remove()
    assert {type(p) for p in m.attn_processors.values()} == {FluxAttnProcessor}
    gsa = GroupSharedAttention(m)
    try:
        with torch.no_grad():
            assert torch.equal(m(**x).sample, stock)
    finally:
        gsa.remove()
