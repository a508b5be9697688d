"""Contract tests of GroupSharedFluxAttnProcessor / GroupSharedAttention on a tiny
random FluxTransformer2DModel (built offline).

* no mode: bit-identical to diffusers' FluxAttnProcessor;
* replay after record == in-batch (targets' rows), several G/T, with and without
  ref_index, fp32 to 1e-5 relative;
* FluxPipeline.__call__ under replay, torch.compile, the fused kernels in the modes.

Training (backward, LoRA, gradient checkpointing) is test_gsa_training.py.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from storyattn import GroupSharedAttention, GroupSharedFluxAttnProcessor, ReferenceKVCache  # noqa: E402

# ----------------------------------------------------------------------------- helpers
# (test_cache.py imports these too)
TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
PER_ROW = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
           "guidance")
TOL = 1e-5


def tiny_flux(seed: int = 0, dtype=torch.float32, **overrides):
    """A random tiny FluxTransformer2DModel; q/k norm weights perturbed so the norms
    are not identities."""
    from diffusers import FluxTransformer2DModel

    g = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed)
    m = FluxTransformer2DModel(**{**TINY, **overrides})
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm_" in name and name.endswith("weight"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return (m if dtype == torch.float32 else m.to(dtype)).eval()


def flux_inputs(batch: int, *, h: int = 4, w: int = 4, text_len: int = 5, seed: int = 0,
                in_channels: int = 16, dtype=torch.float32):
    """FluxTransformer2DModel.forward kwargs: ``batch`` rows, ``h x w`` packed image
    tokens, ``text_len`` text tokens."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return dict(
        hidden_states=torch.randn(batch, h * w, in_channels, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(batch, text_len, 32, generator=g).to(dtype),
        pooled_projections=torch.randn(batch, 32, generator=g).to(dtype),
        timestep=torch.rand(batch, generator=g).to(dtype),
        img_ids=img_ids.reshape(-1, 3).to(dtype),
        txt_ids=torch.zeros(text_len, 3).to(dtype),
    )


def rows(inputs: dict, idx) -> dict:
    idx = torch.as_tensor(list(idx), dtype=torch.long)
    return {k: (v.index_select(0, idx) if k in PER_ROW else v) for k, v in inputs.items()}


def cat_rows(*parts: dict) -> dict:
    out = dict(parts[0])
    for k in PER_ROW:
        if k in out:
            out[k] = torch.cat([p[k] for p in parts], dim=0)
    return out


def record_refs(gsa, model, x, ref_rows):
    """A new ReferenceKVCache holding rows ``ref_rows`` of ``x`` (one record pass, at
    timestep 0: record mode refuses any other)."""
    ref_rows = list(ref_rows)
    cache = ReferenceKVCache()
    with gsa.record(cache):
        model(**zero_ref_timesteps(rows(x, ref_rows), range(len(ref_rows))))
    return cache


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all(), "non-finite values in the result"
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def group_rows(ng: int, G: int, T: int):
    tgt = [g * G + j for g in range(ng) for j in range(T)]
    ref = [[g * G + j for j in range(T, G)] for g in range(ng)]
    return tgt, ref


def zero_ref_timesteps(x: dict, ref_rows) -> dict:
    x = dict(x)
    t = x["timestep"].clone()
    t[list(ref_rows)] = 0
    x["timestep"] = t
    return x


# ----------------------------------------------------------------------------- off mode
def test_off_mode_is_stock_processor_bitwise():
    m = tiny_flux()
    x = flux_inputs(3)
    with torch.no_grad():
        ref = m(**x).sample
        gsa = GroupSharedAttention(m)
        procs = {type(p) for p in m.attn_processors.values()}
        assert procs == {GroupSharedFluxAttnProcessor}
        out = m(**x).sample
        gsa.remove()
        back = m(**x).sample
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    assert {type(p) for p in m.attn_processors.values()} == {FluxAttnProcessor}
    assert torch.equal(out, ref)
    assert torch.equal(back, ref)


def test_off_mode_with_fused_projections_and_attention_mask():
    m = tiny_flux()
    m.fuse_qkv_projections()
    x = flux_inputs(2)
    L = 5 + 16
    mask = torch.ones(2, 1, L, L, dtype=torch.bool)
    mask[..., -3:] = False  # hide the last 3 keys
    with torch.no_grad():
        ref = m(**x).sample
        ref_m = m(**x, joint_attention_kwargs={"attention_mask": mask}).sample
        gsa = GroupSharedAttention(m)
        assert torch.equal(m(**x).sample, ref)
        assert torch.equal(m(**x, joint_attention_kwargs={"attention_mask": mask}).sample, ref_m)
        with gsa.in_batch(2, 1), pytest.raises(ValueError, match="attention_mask"):
            m(**x, joint_attention_kwargs={"attention_mask": mask})


# ----------------------------------------------------------------------------- record/replay == in-batch
@pytest.mark.parametrize("G,T,ng", [(2, 1, 1), (3, 1, 2), (4, 2, 1), (5, 3, 2), (3, 2, 1)])
def test_replay_after_record_equals_in_batch(G, T, ng):
    m = tiny_flux()
    gsa = GroupSharedAttention(m)
    tgt, refs = group_rows(ng, G, T)
    x = zero_ref_timesteps(flux_inputs(ng * G, seed=G * 10 + T), sum(refs, []))
    with torch.no_grad():
        with gsa.in_batch(group_size=G, num_targets=T):
            ib = m(**x).sample
        alone = m(**x).sample  # off mode: every row on its own
        for g in range(ng):
            cache = record_refs(gsa, m, x, refs[g])
            assert len(cache) == G - T
            t_rows = tgt[g * T:(g + 1) * T]
            with gsa.replay(cache):
                rp = m(**rows(x, t_rows)).sample
            assert rel_err(rp, ib[t_rows]) <= TOL
            # the references really changed the targets
            assert rel_err(rp, alone[t_rows]) > 1e-3
        # references attend only to themselves: their rows are their lone forwards
        ref_rows = sum(refs, [])
        assert rel_err(ib[ref_rows], alone[ref_rows]) <= TOL


@pytest.mark.parametrize("G,T", [(3, 1), (4, 2)])
def test_replay_with_ref_index_equals_in_batch(G, T):
    """Entries 0..K-1 are the group's references, then a distractor entry nobody
    reads; each target names the K entries in its own order, padded with -1."""
    m = tiny_flux()
    gsa = GroupSharedAttention(m)
    K = G - T
    x = zero_ref_timesteps(flux_inputs(G, seed=7), range(T, G))
    distractor = zero_ref_timesteps(flux_inputs(1, seed=99), [0])
    with torch.no_grad():
        with gsa.in_batch(G, T):
            ib = m(**x).sample
        cache = record_refs(gsa, m, x, range(T, G))
        with gsa.record(cache):  # appended: entry K
            m(**distractor)
        assert len(cache) == K + 1
        idx = []
        for t in range(T):
            perm = torch.randperm(K, generator=torch.Generator().manual_seed(t)).tolist()
            idx.append(perm + [-1])
        ref_index = torch.tensor(idx)
        with gsa.replay(cache, ref_index=ref_index):
            rp = m(**rows(x, range(T))).sample
        assert rel_err(rp, ib[:T]) <= TOL
        # all -1: the targets read nothing, i.e. their plain forward
        with gsa.replay(cache, ref_index=torch.full((T, 2), -1)):
            none = m(**rows(x, range(T))).sample
        plain = m(**rows(x, range(T))).sample
        assert rel_err(none, plain) <= TOL


def test_bf16_replay_error_within_bf16_in_batch_error():
    """bf16 cache: replay is no further from the fp32 result than bf16 in-batch is."""
    m32 = tiny_flux()
    m16 = tiny_flux().to(torch.bfloat16)
    x = zero_ref_timesteps(flux_inputs(4, seed=12), [2, 3])
    x16 = {k: v.to(torch.bfloat16) for k, v in x.items()}
    outs = {}
    with torch.no_grad():
        for name, m, xx in (("fp32", m32, x), ("bf16", m16, x16)):
            gsa = GroupSharedAttention(m)
            with gsa.in_batch(4, 2):
                ib = m(**xx).sample
            cache = record_refs(gsa, m, xx, [2, 3])
            assert cache.dtype == m.dtype
            with gsa.replay(cache):
                rp = m(**rows(xx, [0, 1])).sample
            outs[name] = (ib[:2].float(), rp.float())
    ref = outs["fp32"][0]
    e_ib, e_rp = rel_err(outs["bf16"][0], ref), rel_err(outs["bf16"][1], ref)
    assert e_rp <= 2 * e_ib + 1e-3, (e_rp, e_ib)


def test_ref_index_multi_group_shared_cache_placement_none():
    """With placement='none' an entry's keys do not depend on its number, so one
    cache holding every group's references serves all groups through ref_index."""
    G, T, ng = 3, 1, 3
    K = G - T
    m = tiny_flux()
    gsa = GroupSharedAttention(m, placement="none")
    tgt, refs = group_rows(ng, G, T)
    x = zero_ref_timesteps(flux_inputs(ng * G, seed=3), sum(refs, []))
    with torch.no_grad():
        with gsa.in_batch(G, T):
            ib = m(**x).sample
        cache = record_refs(gsa, m, x, sum(refs, []))
        ref_index = torch.tensor([[g * K + j for j in range(K)] for g in range(ng)])
        with gsa.replay(cache, ref_index=ref_index):
            rp = m(**rows(x, tgt)).sample
    assert rel_err(rp, ib[tgt]) <= TOL


def test_custom_placement_callable():
    m = tiny_flux()
    gsa = GroupSharedAttention(m, placement=lambda i: (0, 0, 20 + 3 * i))
    x = zero_ref_timesteps(flux_inputs(3, seed=5), [1, 2])
    with torch.no_grad():
        with gsa.in_batch(3, 1):
            ib = m(**x).sample
        cache = record_refs(gsa, m, x, [1, 2])
        assert cache.signature.placement.startswith("custom:")
        with gsa.replay(cache):
            rp = m(**rows(x, [0])).sample
    assert rel_err(rp, ib[:1]) <= TOL


def test_modes_do_not_nest_and_bad_arguments():
    m = tiny_flux()
    gsa = GroupSharedAttention(m)
    with pytest.raises(RuntimeError, match="already runs GroupSharedFluxAttnProcessor"):
        GroupSharedAttention(m)
    with pytest.raises(ValueError, match="num_targets"):
        gsa.in_batch(group_size=2, num_targets=3)
    with gsa.in_batch(2, 1):
        with pytest.raises(RuntimeError, match="do not nest"):
            with gsa.in_batch(2, 1):
                pass
        with pytest.raises(ValueError, match="not a whole number of groups"), torch.no_grad():
            m(**flux_inputs(3))
    cache = ReferenceKVCache()
    with pytest.raises(ValueError, match="empty"):
        gsa.replay(cache)
    with torch.no_grad(), gsa.record(cache):
        m(**zero_ref_timesteps(flux_inputs(2), [0, 1]))
    with pytest.raises(ValueError, match=r"ref_index values must lie in \[-1, 2\)"):
        gsa.replay(cache, ref_index=torch.tensor([[0, 2]]))
    with pytest.raises(TypeError, match="integer"):
        gsa.replay(cache, ref_index=torch.tensor([[0.0]]))
    with gsa.replay(cache, ref_index=torch.tensor([[0], [1]])), torch.no_grad():
        with pytest.raises(ValueError, match="ref_index has 2 rows but the batch has 3"):
            m(**flux_inputs(3))
    gsa.remove()
    with pytest.raises(RuntimeError, match="removed"):
        gsa.in_batch(2, 1)


# ----------------------------------------------------------------------------- FluxPipeline
@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from diffusers import FluxPipeline
    from pipelines.tiny import build_tiny_flux

    path = build_tiny_flux(tmp_path_factory.mktemp("tinyflux") / "flux")
    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipe_call(pipe, prompt, **kw):
    args = dict(height=64, width=64, num_inference_steps=2, max_sequence_length=32,
                guidance_scale=3.5, output_type="latent",
                generator=torch.Generator().manual_seed(0))
    args.update(kw)
    return pipe(prompt, **args).images


def test_flux_pipeline_with_replay(tiny_pipe):
    pipe = tiny_pipe
    tr = pipe.transformer
    gsa = GroupSharedAttention(tr)
    try:
        # references: clean latents at timestep 0, recorded once
        with torch.no_grad():
            pe, pooled, txt_ids = pipe.encode_prompt(["a red fox", "a blue bird"], None,
                                                     max_sequence_length=32)[:3]
            lat = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(5))
            img_ids = pipe._prepare_latent_image_ids(1, 8, 8, lat.device, lat.dtype)
            ref_in = dict(hidden_states=lat, encoder_hidden_states=pe, pooled_projections=pooled,
                          timestep=torch.zeros(2), guidance=torch.full((2,), 3.5),
                          txt_ids=txt_ids, img_ids=img_ids)
            cache = ReferenceKVCache()
            with gsa.record(cache):
                tr(**ref_in)
        assert len(cache) == 2

        # capture the transformer's first call in the pipeline, then check it
        # against in-batch on [target ; references] with the same inputs.
        seen = []

        def grab(mod, args, kwargs, out):
            if not seen:
                seen.append(({k: v for k, v in kwargs.items() if k != "joint_attention_kwargs"},
                             out[0] if isinstance(out, tuple) else out.sample))

        h = tr.register_forward_hook(grab, with_kwargs=True)
        with gsa.replay(cache):
            lat_rp = _pipe_call(pipe, "a fox and a bird")
        h.remove()
        plain = _pipe_call(pipe, "a fox and a bird")
        assert torch.isfinite(lat_rp).all()
        assert rel_err(lat_rp, plain) > 1e-4
        kw, out_rp = seen[0]
        joint = {k: (torch.cat([kw[k], ref_in[k]]) if k in ("hidden_states", "encoder_hidden_states",
                                                           "pooled_projections", "timestep",
                                                           "guidance") else kw[k])
                 for k in kw if k not in ("return_dict",)}
        with torch.no_grad(), gsa.in_batch(group_size=3, num_targets=1):
            ib = tr(**joint, return_dict=False)[0]
        assert rel_err(out_rp, ib[:1]) <= TOL

        # num_images_per_prompt=2 + true CFG (negative prompt = second forward);
        # ref_index has one row per prompt and is repeated per image.
        with gsa.replay(cache, ref_index=torch.tensor([[0, -1], [1, 0]])):
            lat2 = _pipe_call(pipe, ["a fox", "a bird"], num_images_per_prompt=2,
                              negative_prompt=["blurry", "blurry"], true_cfg_scale=2.0)
        assert lat2.shape[0] == 4 and torch.isfinite(lat2).all()
        with gsa.replay(cache, ref_index=torch.tensor([[0], [1], [0]])):
            with pytest.raises(ValueError, match="ref_index has 3 rows but the batch has 4"):
                _pipe_call(pipe, ["a fox", "a bird"], num_images_per_prompt=2)
        # every target reading nothing == the plain pipeline
        with gsa.replay(cache, ref_index=torch.full((1, 1), -1)):
            lat_none = _pipe_call(pipe, "a fox and a bird")
        assert rel_err(lat_none, plain) <= TOL
    finally:
        gsa.remove()


# ----------------------------------------------------------------------------- torch.compile
def _compile_case(backend):
    m = tiny_flux()
    gsa = GroupSharedAttention(m)
    x = flux_inputs(2, seed=8)
    cache = ReferenceKVCache()
    with torch.no_grad():
        with gsa.record(cache):
            m(**zero_ref_timesteps(flux_inputs(3, seed=9), [0, 1, 2]))
        cm = torch.compile(m, backend=backend, fullgraph=True)
        ri = torch.tensor([[0, 2], [1, -1]])
        for ref_index in (None, ri):
            with gsa.replay(cache, ref_index=ref_index):
                eager = m(**x).sample
                comp = cm(**x).sample
                comp2 = cm(**x).sample  # second call: no recompilation needed
            assert rel_err(comp, eager) <= TOL
            assert torch.equal(comp, comp2)
    torch._dynamo.reset()


def test_torch_compile_replay_fullgraph_aot_eager():
    """Whole-graph capture (no graph breaks, ref_index included) through AOTAutograd."""
    _compile_case("aot_eager")


def test_torch_compile_replay_inductor():
    """The real compiler (Inductor, CPU C++ codegen): ~30 s on 2 cores."""
    _compile_case("inductor")


def test_triton_backends_match_torch():
    """Fused Triton segment attention + q/k norm/RoPE (interpreter on CPU) in the modes."""
    import storyattn

    if "triton" not in storyattn.available_backends():
        pytest.skip("triton backend not available here (needs CUDA or TRITON_INTERPRET=1)")
    m = tiny_flux()
    x = zero_ref_timesteps(flux_inputs(3, seed=1), [1, 2])
    res = {}
    for be in ("torch", "triton"):
        gsa = GroupSharedAttention(m, backend=be, rope_backend=be)
        with torch.no_grad():
            cache = record_refs(gsa, m, x, [1, 2])
            with gsa.replay(cache):
                rp = m(**rows(x, [0])).sample
            with gsa.replay(cache, ref_index=torch.tensor([[1, -1]])):
                rp2 = m(**rows(x, [0])).sample
            with gsa.in_batch(3, 1):
                ib = m(**x).sample
        res[be] = (rp, rp2, ib)
        gsa.remove()
    for a, b in zip(res["torch"], res["triton"]):
        assert rel_err(b, a) <= TOL
    assert rel_err(res["triton"][0], res["triton"][2][:1]) <= TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_rope_kernel_in_the_modes(emu, dtype):
    """rope_backend="cuda": csrc/qk_norm_rope.cu (here through the host emulation)
    does the q/k norm + RoPE of every FLUX block in record, replay and in-batch
    mode, writing the reference K/V into the cache in the record pass.  Same
    results as the torch path, to the fused kernel's ulp-level differences."""
    m = tiny_flux(dtype=dtype)
    x = zero_ref_timesteps(flux_inputs(3, seed=4), [1, 2])
    x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in x.items()}
    res, caches = {}, {}
    for rb in ("torch", "cuda"):
        gsa = GroupSharedAttention(m, rope_backend=rb)
        with torch.no_grad():
            cache = record_refs(gsa, m, x, [1, 2])
            with gsa.replay(cache):
                rp = m(**rows(x, [0])).sample
            with gsa.in_batch(3, 1):
                ib = m(**x).sample
        res[rb], caches[rb] = (rp.float(), ib.float()), cache
        gsa.remove()
    tol = TOL if dtype == torch.float32 else 2e-2
    for a, b in zip(res["torch"], res["cuda"]):
        assert rel_err(b, a) <= tol, rel_err(b, a)
    # the record pass wrote the same reference keys/values through the kernel
    assert len(caches["cuda"]) == len(caches["torch"]) == 2
    for layer in range(caches["torch"].num_layers):
        kt, vt = caches["torch"].layer(layer)
        kc, vc = caches["cuda"].layer(layer)
        if layer == 0:  # later layers' inputs carry the earlier layers' ulp differences
            assert torch.equal(vt, vc)
        assert rel_err(vc.float(), vt.float()) <= tol
        assert rel_err(kc.float(), kt.float()) <= tol


def test_load_lora_weights_into_installed_pipeline(tiny_pipe, tmp_path):
    """A LoRA file loaded with diffusers' load_lora_weights after GSA is installed:
    the processors stay, the adapter is live in every mode."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe, tr = tiny_pipe, tiny_pipe.transformer
    gsa = GroupSharedAttention(tr)
    try:
        tr.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                  target_modules=["to_q", "to_k", "to_v", "to_out.0",
                                                  "ff.net.0.proj", "ff.net.2"]),
                       adapter_name="tmp")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in tr.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
        sd = get_peft_model_state_dict(tr, adapter_name="tmp")
        FluxPipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=sd)
        tr.delete_adapters("tmp")

        cfg = tr.config
        side = 8
        x = flux_inputs(3, h=side, w=side, text_len=7, seed=3, in_channels=cfg.in_channels)
        x["encoder_hidden_states"] = torch.randn(3, 7, cfg.joint_attention_dim)
        x["pooled_projections"] = torch.randn(3, cfg.pooled_projection_dim)
        x["guidance"] = torch.full((3,), 3.5)
        x = zero_ref_timesteps(x, [1, 2])
        with torch.no_grad():
            base = tr(**rows(x, [0])).sample
            pipe.load_lora_weights(str(tmp_path), adapter_name="story")
            assert {type(p) for p in tr.attn_processors.values()} == {GroupSharedFluxAttnProcessor}
            with gsa.in_batch(3, 1):
                ib = tr(**x).sample
            cache = record_refs(gsa, tr, x, [1, 2])
            with gsa.replay(cache):
                rp = tr(**rows(x, [0])).sample
            plain_lora = tr(**rows(x, [0])).sample
        assert rel_err(rp, ib[:1]) <= TOL
        assert rel_err(plain_lora, base) > 1e-4  # the loaded adapter is active
    finally:
        pipe.unload_lora_weights()
        gsa.remove()


def test_replaced_processor_is_detected():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    m = tiny_flux()
    gsa = GroupSharedAttention(m)
    m.transformer_blocks[0].attn.set_processor(FluxAttnProcessor())
    with pytest.raises(RuntimeError, match=r"attention layers \[0\] no longer run"):
        with gsa.in_batch(2, 1):
            pass
