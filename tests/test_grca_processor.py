"""GlobalReferenceAttnProcessor (GRCA) against diffusers' own IP-Adapter processor.

Ground truth is diffusers itself: ``IPAdapterAttnProcessor2_0`` fed the same images as
multi-image input to one adapter (``ip_adapter_image=[[img_1, ..., img_N]]``), same scale.
Everything runs on the tiny offline SDXL preset (random weights, real loaders), fp32.
"""
import copy

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from storyattn.grca import install_global_reference_attention  # noqa: E402
from storyattn.processors.grca import GlobalReferenceAttnProcessor  # noqa: E402

ATOL = 2e-5
RTOL = 1e-4


def assert_close(ours, ref, atol=ATOL, rtol=RTOL, what="output"):
    assert torch.isfinite(ours).all(), f"{what}: non-finite values in ours"
    diff = (ours.double() - ref.double()).abs()
    tol = atol + rtol * ref.double().abs()
    bad = diff > tol
    if bad.any():
        i = int(torch.argmax(diff - tol))
        idx = np.unravel_index(i, diff.shape)
        raise AssertionError(f"{what}: {int(bad.sum())} / {diff.numel()} elements differ; worst at "
                             f"{tuple(int(x) for x in idx)}: ours {ours.flatten()[i].item():.6g} vs "
                             f"ref {ref.flatten()[i].item():.6g} (max abs diff "
                             f"{diff.max().item():.3g})")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionXLPipeline

    from pipelines.tiny import get_tiny_sdxl, sdxl_ip_adapter_kwargs

    path = get_tiny_sdxl()
    p = StableDiffusionXLPipeline.from_pretrained(path, torch_dtype=torch.float32)
    p.load_ip_adapter(**sdxl_ip_adapter_kwargs(path))
    p.set_progress_bar_config(disable=True)
    return p


def _images(n, seed=0, size=64):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(n)]


def _embeds(pipe, images):
    emb, _ = pipe.encode_image(images, "cpu", 1, False)
    return emb  # [N, E]


def _unet_inputs(pipe, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    sample = torch.randn(batch, cfg.in_channels, 8, 8, generator=g)
    text = torch.randn(batch, 7, cfg.cross_attention_dim, generator=g)
    added = {
        "text_embeds": torch.randn(batch, 32, generator=g),
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1),
    }
    return sample, text, added


@pytest.mark.parametrize("n_refs, backend", [(1, None), (3, None), (7, None), (3, "sdpa")])
@pytest.mark.parametrize("guidance", [False, True])
def test_unet_equals_diffusers_multi_image(pipe, n_refs, guidance, backend):
    """One UNet forward: GRCA with N references == diffusers with N images for one adapter."""
    unet = pipe.unet
    scale = 0.37
    emb = _embeds(pipe, _images(n_refs, seed=n_refs))
    B = 4 if guidance else 3
    sample, text, added = _unet_inputs(pipe, B)
    t = torch.tensor(500)

    pipe.set_ip_adapter_scale(scale)
    if guidance:
        # diffusers' layout: [negative ; positive], negative image embeds are zeros
        cond = emb[None].expand(B // 2, -1, -1)
        ip = torch.cat([torch.zeros_like(cond), cond])
    else:
        ip = emb[None].expand(B, -1, -1)
    with torch.no_grad():
        ref = unet(sample, t, encoder_hidden_states=text,
                   added_cond_kwargs={**added, "image_embeds": [ip]}).sample

    handle = install_global_reference_attention(unet)
    try:
        sample_nan = sample.clone()
        with torch.no_grad(), handle.references(emb, scale=scale, guidance=guidance,
                                                backend=backend):
            assert unet.encoder_hid_proj is None
            ours = unet(sample_nan, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
        assert unet.encoder_hid_proj is not None
    finally:
        handle.remove()
    assert_close(ours, ref, what=f"unet N={n_refs} guidance={guidance}")


def test_pipeline_equals_diffusers(pipe):
    """Whole SDXL pipeline with CFG, 2 steps, 2 frames: same latents as diffusers'
    multi-image IP-Adapter call with the same images, scale and generators."""
    imgs = _images(3, seed=11)
    scale = 0.45
    prompts = ["a snowman in the snow", "a red fox in the forest"]
    kw = dict(num_inference_steps=2, guidance_scale=5.0, height=64, width=64, output_type="latent")

    pipe.set_ip_adapter_scale(scale)
    gens = [torch.Generator().manual_seed(5 + i) for i in range(2)]
    ref = pipe(prompt=prompts, ip_adapter_image=[imgs], generator=gens, **kw).images

    emb = _embeds(pipe, imgs)
    handle = install_global_reference_attention(pipe.unet)
    try:
        gens = [torch.Generator().manual_seed(5 + i) for i in range(2)]
        with handle.references(emb, scale=scale, guidance=True):
            ours = pipe(prompt=prompts, generator=gens, **kw).images
    finally:
        handle.remove()
    assert_close(ours, ref, what="pipeline latents")


def test_select_subset_equals_diffusers_subset(pipe):
    """Per-row subsets (ref_index) equal diffusers fed just that subset of images."""
    unet = pipe.unet
    imgs = _images(4, seed=3)
    emb = _embeds(pipe, imgs)
    sample, text, added = _unet_inputs(pipe, 2, seed=4)
    t = torch.tensor(300)
    subsets = [[2, 0], [3]]
    pipe.set_ip_adapter_scale(0.5)
    refs = []
    with torch.no_grad():
        for row, sel in enumerate(subsets):
            ip = emb[sel][None]
            r = unet(sample[row:row + 1], t, encoder_hidden_states=text[row:row + 1],
                     added_cond_kwargs={"text_embeds": added["text_embeds"][row:row + 1],
                                        "time_ids": added["time_ids"][row:row + 1],
                                        "image_embeds": [ip]}).sample
            refs.append(r)
    ref = torch.cat(refs)
    handle = install_global_reference_attention(unet)
    try:
        with torch.no_grad(), handle.references(emb, scale=0.5, guidance=False), \
                handle.select(subsets):
            ours = unet(sample, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
    finally:
        handle.remove()
    # subsets are ordered differently from diffusers' ([2, 0] vs emb[[2, 0]]) on purpose:
    # the pool entry order inside a softmax does not matter
    assert_close(ours, ref, what="select")


def test_kv_computed_once_per_round(pipe):
    """The to_k_ip/to_v_ip projections run once per layer per round, not per step/frame."""
    unet = pipe.unet
    emb = _embeds(pipe, _images(5, seed=2))
    handle = install_global_reference_attention(unet)
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1

    hooks = [p.to_k_ip[0].register_forward_hook(hook) for p in handle.processors.values()]
    try:
        gens = [torch.Generator().manual_seed(i) for i in range(3)]
        with handle.references(emb, scale=0.3, guidance=True):
            n_after_fill = calls["n"]
            pipe(prompt=["a", "b", "c"], generator=gens, num_inference_steps=3, guidance_scale=4.0,
                 height=64, width=64, output_type="latent")
            assert handle.nbytes > 0
        n_layers = len(handle.processors)
        # reference tokens + null tokens, once each per layer
        assert n_after_fill == 2 * n_layers
        assert calls["n"] == n_after_fill, "reference K/V recomputed during denoising"
        assert handle.kv_fills == n_layers
        assert handle.nbytes == 0  # released when the round closes
    finally:
        for h in hooks:
            h.remove()
        handle.remove()


def test_remove_restores_stock_processors_and_state_dict(pipe):
    unet = pipe.unet
    pipe.set_ip_adapter_scale(0.6)
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    keys_before = set(unet.state_dict().keys())
    handle = install_global_reference_attention(unet)
    kinds = {type(v) for k, v in unet.attn_processors.items() if "attn2" in k}
    assert kinds == {GlobalReferenceAttnProcessor}
    assert set(unet.state_dict().keys()) == keys_before  # same parameter names while installed

    # no round open: identical to the stock processor (image embeds through the UNet)
    emb = _embeds(pipe, _images(2, seed=9))
    sample, text, added = _unet_inputs(pipe, 2, seed=8)
    ip = emb[None].expand(2, -1, -1)
    with torch.no_grad():
        ours = unet(sample, 10, encoder_hidden_states=text,
                    added_cond_kwargs={**added, "image_embeds": [ip]}).sample
    handle.remove()
    handle.remove()  # idempotent
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    pipe.set_ip_adapter_scale(0.6)
    with torch.no_grad():
        ref = unet(sample, 10, encoder_hidden_states=text,
                   added_cond_kwargs={**added, "image_embeds": [ip]}).sample
    assert torch.equal(ours, ref)


def test_errors_are_clear(pipe):
    unet = pipe.unet
    emb = _embeds(pipe, _images(2))
    handle = install_global_reference_attention(unet)
    try:
        with pytest.raises(RuntimeError, match="already has"):
            install_global_reference_attention(unet)
        with pytest.raises(ValueError, match="give image_embeds or tokens"):
            with handle.references(scale=0.3):
                pass
        with handle.references(emb, scale=0.3, guidance=False):
            with pytest.raises(RuntimeError, match="already open"):
                with handle.references(emb, scale=0.3):
                    pass
            with pytest.raises(ValueError, match="names entry 5"):
                with handle.select([[5]]):
                    pass
        with pytest.raises(RuntimeError, match="select"):
            with handle.select([[0]]):
                pass
    finally:
        handle.remove()
    plain = copy.deepcopy(unet)
    plain.set_default_attn_processor()
    with pytest.raises(ValueError, match="load_ip_adapter"):
        install_global_reference_attention(plain)


def test_exported_from_package():
    import storyattn

    assert storyattn.GlobalReferenceAttnProcessor is GlobalReferenceAttnProcessor
    assert storyattn.install_global_reference_attention is install_global_reference_attention


def test_text_only_equals_scale_zero(pipe):
    """Round 0 (no references) equals diffusers' IP-Adapter at scale 0."""
    unet = pipe.unet
    emb = _embeds(pipe, _images(2, seed=5))
    sample, text, added = _unet_inputs(pipe, 2, seed=6)
    pipe.set_ip_adapter_scale(0.0)
    with torch.no_grad():
        ref = unet(sample, 20, encoder_hidden_states=text,
                   added_cond_kwargs={**added, "image_embeds": [emb[None].expand(2, -1, -1)]}).sample
    handle = install_global_reference_attention(unet)
    try:
        with torch.no_grad(), handle.text_only():
            ours = unet(sample, 20, encoder_hidden_states=text, added_cond_kwargs=added).sample
    finally:
        handle.remove()
    assert_close(ours, ref, what="text only")


def _random_layer(g, heads, dim_head, cross, std=0.2, **stock_kw):
    """A diffusers Attention layer with the stock IP-Adapter processor installed, every weight
    drawn from ``g`` (the layer's first, then the processor's)."""
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

    inner = heads * dim_head
    attn = Attention(query_dim=inner, cross_attention_dim=cross, heads=heads, dim_head=dim_head)
    stock = IPAdapterAttnProcessor2_0(hidden_size=inner, cross_attention_dim=cross, **stock_kw)
    with torch.no_grad():
        for p in list(attn.parameters()) + list(stock.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    attn.set_processor(stock)
    return attn, stock


def _open_grca(attn, stock, ref_tok, null_tok, scale, guidance, **state):
    """GRCA installed over ``stock`` on ``attn``, its round open on ``ref_tok`` (and the null
    tokens with guidance); ``state``: further GRCAState fields (ref_index, regions, ...)."""
    from storyattn.processors.grca import GRCAState

    st = GRCAState()
    proc = GlobalReferenceAttnProcessor(stock, st, "layer.processor")
    with torch.no_grad():
        kv = proc.compute_kv(attn, ref_tok, null_tok if guidance else None)
    st.kv, st.scale, st.guidance = {"layer.processor": kv}, scale, guidance
    st.num_refs, st.active = ref_tok.shape[0], True
    for k, v in state.items():
        setattr(st, k, v)
    attn.set_processor(proc)
    return st


@pytest.mark.parametrize("dim_head, heads, lq, n_refs, tokens", [
    (40, 2, 97, 5, 4), (72, 3, 1, 1, 4), (32, 4, 130, 9, 16)])
@pytest.mark.parametrize("guidance", [False, True])
def test_layer_odd_shapes(dim_head, heads, lq, n_refs, tokens, guidance):
    """One diffusers Attention layer with odd head dims / lengths / token counts (16 tokens:
    IP-Adapter Plus): GRCA == stock IPAdapterAttnProcessor2_0 fed the N images' tokens."""
    g = torch.Generator().manual_seed(dim_head + lq)
    inner, cross = heads * dim_head, 48
    attn, stock = _random_layer(g, heads, dim_head, cross, num_tokens=(tokens,), scale=0.7)
    rows = 4 if guidance else 3
    hs = torch.randn(rows, lq, inner, generator=g)
    text = torch.randn(rows, 11, cross, generator=g)
    ref_tok = torch.randn(n_refs, tokens, cross, generator=g)
    null_tok = torch.randn(1, tokens, cross, generator=g)
    if guidance:
        ip = torch.cat([null_tok[None].expand(rows // 2, n_refs, -1, -1),
                        ref_tok[None].expand(rows // 2, -1, -1, -1)])
    else:
        ip = ref_tok[None].expand(rows, -1, -1, -1)
    with torch.no_grad():
        ref = attn(hs, encoder_hidden_states=(text, [ip]))

    _open_grca(attn, stock, ref_tok, null_tok, 0.7, guidance)
    with torch.no_grad():
        out = attn(hs, encoder_hidden_states=text)
    assert_close(out, ref, what=f"layer d={dim_head} lq={lq} N={n_refs} T={tokens}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_low_precision_error_bound(dtype):
    """bf16/fp16: GRCA's error against a float64 run of the stock processor is within twice
    the stock processor's own error in the same dtype."""
    g = torch.Generator().manual_seed(3)
    heads, dim_head, cross, n_refs, rows = 2, 40, 48, 6, 4
    inner = heads * dim_head
    attn, stock = _random_layer(g, heads, dim_head, cross, scale=0.5)
    hs = torch.randn(rows, 64, inner, generator=g)
    text = torch.randn(rows, 11, cross, generator=g)
    ref_tok = torch.randn(n_refs, 4, cross, generator=g)
    null_tok = torch.randn(1, 4, cross, generator=g)
    ip = torch.cat([null_tok[None].expand(2, n_refs, -1, -1), ref_tok[None].expand(2, -1, -1, -1)])

    def stock_run(dt):
        a, st = copy.deepcopy(attn).to(dt), copy.deepcopy(stock).to(dt)
        a.set_processor(st)
        with torch.no_grad():
            return a(hs.to(dt), encoder_hidden_states=(text.to(dt), [ip.to(dt)])).double(), a, st

    ref64, _, _ = stock_run(torch.float64)
    low, a, st = stock_run(dtype)
    _open_grca(a, st, ref_tok, null_tok, 0.5, True)
    with torch.no_grad():
        ours = a(hs.to(dtype), encoder_hidden_states=text.to(dtype))
    assert ours.dtype == dtype
    err_ours = (ours.double() - ref64).abs().max().item()
    err_stock = (low - ref64).abs().max().item()
    assert err_ours <= 2 * err_stock + 1e-3, (err_ours, err_stock)


@pytest.mark.parametrize("guidance", [False, True])
def test_layer_regions_equal_stock_per_token_group(guidance):
    """A layout (one box per entry a row reads): each image token's reference term is the
    stock IPAdapterAttnProcessor2_0 fed only the entries whose box covers the token's centre
    (every entry of the row for a token in no box; an entry without a box for all tokens).
    The token groups are computed here from the boxes' geometry, independently of
    storyattn.region_masks."""
    g = torch.Generator().manual_seed(5)
    heads, dim_head, cross, n_refs, T = 2, 16, 24, 5, 4
    inner = heads * dim_head
    h, w = 6, 8                                   # a 3:4 frame, 48 image tokens
    attn, stock = _random_layer(g, heads, dim_head, cross, std=0.3, scale=0.6)
    ref_index = [[0, 3], [4, 1, 2], [2, -1]]
    boxes = [[(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)],      # a duo: left and right
             [(0.25, 0.5, 0.75, 1.0), None, None],               # one box, two free entries
             [None, None]]                                        # no layout: all read all
    n_cond = len(ref_index)
    rows = 2 * n_cond if guidance else n_cond
    hs = torch.randn(rows, h * w, inner, generator=g)
    text = torch.randn(rows, 7, cross, generator=g)
    ref_tok = torch.randn(n_refs, T, cross, generator=g)
    null_tok = torch.randn(1, T, cross, generator=g)

    def reads(row, tok):
        cy, cx = (tok // w + 0.5) / h, (tok % w + 0.5) / w
        sel = [j for j in ref_index[row] if j >= 0]
        bx = boxes[row] + [None] * (len(ref_index[row]) - len(boxes[row]))
        inside = [j for j, b in zip(ref_index[row], bx)
                  if j >= 0 and b is not None and b[0] <= cx < b[2] and b[1] <= cy < b[3]]
        free = [j for j, b in zip(ref_index[row], bx) if j >= 0 and b is None]
        return sorted(set(inside + free)) if inside else sel

    expected = torch.empty(rows, h * w, inner)
    with torch.no_grad():
        for c in range(n_cond):
            groups = {}
            for tok in range(h * w):
                groups.setdefault(tuple(reads(c, tok)), []).append(tok)
            for sel, toks in groups.items():
                toks = torch.tensor(toks)
                ip_c = ref_tok[list(sel)][None]
                if guidance:
                    r2 = torch.tensor([c, n_cond + c])
                    ip = torch.cat([null_tok[None].expand(1, len(sel), -1, -1), ip_c])
                    o = attn(hs[r2], encoder_hidden_states=(text[r2], [ip]))
                    expected[c, toks] = o[0, toks]
                    expected[n_cond + c, toks] = o[1, toks]
                else:
                    o = attn(hs[c:c + 1], encoder_hidden_states=(text[c:c + 1], [ip_c]))
                    expected[c, toks] = o[0, toks]

    state = _open_grca(attn, stock, ref_tok, null_tok, 0.6, guidance,
                       ref_index=torch.tensor([r + [-1] * (3 - len(r)) for r in ref_index]),
                       regions=boxes, aspect=h / w)
    with torch.no_grad():
        out = attn(hs, encoder_hidden_states=text)
    assert_close(out, expected, what="regional GRCA")
    # the token groups were computed once per row with a layout (not per call) and reused
    assert set(state.region_groups) == {(0, h * w), (1, h * w)}
    with torch.no_grad():
        again = attn(hs, encoder_hidden_states=text)
    assert torch.equal(again, out)
    # the layout changes what the boxed tokens read: without it the duo row differs
    state.regions = None
    with torch.no_grad():
        plain = attn(hs, encoder_hidden_states=text)
    c0 = n_cond if guidance else 0
    assert not torch.allclose(plain[c0], out[c0], atol=1e-4)


def test_select_regions_errors(pipe):
    handle = install_global_reference_attention(pipe.unet)
    try:
        emb = _embeds(pipe, _images(2))
        with handle.references(emb, scale=0.5, guidance=False):
            with pytest.raises(ValueError, match="size"):
                with handle.select([[0, 1]], regions=[[(0, 0, .5, 1), None]]):
                    pass
            with pytest.raises(ValueError, match="ref_index"):
                with handle.select(None, regions=[[None]], size=(64, 64)):
                    pass
            with pytest.raises(ValueError, match="rows"):
                with handle.select([[0], [1]], regions=[[None]], size=(64, 64)):
                    pass
            # a select leaves no token groups behind for the next one
            handle.state.region_groups[(0, 4)] = []
            with handle.select([[0, 1]], regions=[[(0, 0, .5, 1), None]], size=(64, 64)):
                assert not handle.state.region_groups
            assert not handle.state.region_groups
    finally:
        handle.remove()
