"""Drop-in on FLUX.2: with GSA installed and no mode active, diffusers' FLUX.2 features
behave as they do without it, and a compiled transformer never recompiles.

diffusers' own FLUX.2 suites are not shipped with the wheel or the sdist (and their
pipeline tests fetch a tokenizer from the Hub), so this file runs the same kinds of
checks on the offline tiny preset and on diffusers-sized tiny transformers: the
transformer model (forward, KV extract/cached, gradient checkpointing, fused QKV,
save/load, attention backend), the FLUX.2 / klein / klein-KV pipelines (sizes, batches,
images per prompt, CFG, reference images) and FLUX.2 LoRA (add, save, load, fuse,
scale, disable).  Every check runs twice, ``stock`` and ``gsa`` (installed, no mode),
asserts its own properties both times, and under ``gsa`` must give tensors
bit-identical to ``stock``.
"""
import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounter

pytest.importorskip("diffusers")

from storyattn import GroupSharedAttention, ReferenceKVCache  # noqa: E402

_STOCK = {}


def _tiny_transformer(guidance=False, seed=0, double=1, single=1):
    """The size diffusers' FLUX.2 transformer tests use (1 double + 1 single block)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=double, num_single_layers=single,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
        timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=guidance).eval()


def _inputs(batch=1, n_img=16, n_txt=4, seed=0, guidance=None):
    from storyattn.flux2 import flux2_image_ids

    g = torch.Generator().manual_seed(seed)
    side = int(n_img ** 0.5)
    return dict(hidden_states=torch.randn(batch, n_img, 4, generator=g),
                encoder_hidden_states=torch.randn(batch, n_txt, 16, generator=g),
                timestep=torch.full((batch,), 0.6), img_ids=flux2_image_ids(side, side),
                txt_ids=torch.stack([torch.zeros(n_txt)] * 3 + [torch.arange(n_txt).float()], -1),
                guidance=None if guidance is None else torch.full((batch,), guidance),
                return_dict=False)


def _set_kv(tr):
    from diffusers.models.transformers.transformer_flux2 import (Flux2KVAttnProcessor,
                                                                 Flux2KVParallelSelfAttnProcessor)

    for b in tr.transformer_blocks:
        b.attn.set_processor(Flux2KVAttnProcessor())
    for b in tr.single_transformer_blocks:
        b.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    return tr


# ----------------------------------------------------------------------------- model checks
def check_model_forward(install):
    tr = install(_tiny_transformer())
    with torch.no_grad():
        a, b = tr(**_inputs(2))[0], tr(**_inputs(2))[0]
    assert a.shape == (2, 16, 4) and torch.equal(a, b)
    return [a]


def check_model_guidance_embeds(install):
    tr = install(_tiny_transformer(guidance=True))
    with torch.no_grad():
        a, b = tr(**_inputs(1, guidance=3.5))[0], tr(**_inputs(1, guidance=1.0))[0]
    assert not torch.equal(a, b)
    return [a, b]


def check_model_kv_extract_and_cached(install):
    tr = install(_set_kv(_tiny_transformer()))
    ref, tgt = _inputs(1, seed=1), _inputs(2, seed=2)
    from storyattn.flux2 import flux2_image_ids

    x = dict(tgt, hidden_states=torch.cat([ref["hidden_states"].expand(2, -1, -1),
                                           tgt["hidden_states"]], 1),
             img_ids=torch.cat([flux2_image_ids(4, 4, t=10), tgt["img_ids"]]))
    with torch.no_grad():
        out, cache = tr(**x, kv_cache_mode="extract", num_ref_tokens=16)
        cached = tr(**tgt, kv_cache=cache, kv_cache_mode="cached")[0]
        plain = tr(**tgt)[0]
    assert out.shape == (2, 16, 4) and cache.num_ref_tokens == 16
    assert (cached - plain).abs().max() > 1e-4  # the cached references take part
    k, v = cache.get_single(0).get()
    return [out, cached, k, v, *cache.get_double(0).get()]


def check_model_gradient_checkpointing(install):
    outs = []
    for ckpt in (False, True):
        tr = install(_tiny_transformer())
        tr.train()
        if ckpt:
            tr.enable_gradient_checkpointing()
        x = _inputs(2)
        out = tr(**x)[0]
        out.square().mean().backward()
        outs.append((out.detach(), tr.x_embedder.weight.grad.clone()))
    assert torch.allclose(outs[0][0], outs[1][0]) and torch.allclose(outs[0][1], outs[1][1])
    return [outs[1][0], outs[1][1]]


def check_model_fused_qkv(install):
    tr = install(_tiny_transformer())
    with torch.no_grad():
        before = tr(**_inputs(1))[0]
        tr.fuse_qkv_projections()
        assert tr.transformer_blocks[0].attn.fused_projections
        fused = tr(**_inputs(1))[0]
        tr.unfuse_qkv_projections()
        after = tr(**_inputs(1))[0]
    assert torch.allclose(before, fused, atol=1e-5) and torch.equal(before, after)
    return [fused]


def check_model_save_load(install, tmp_path):
    from diffusers import Flux2Transformer2DModel

    tr = install(_tiny_transformer())
    tr.save_pretrained(tmp_path / "tr")
    back = install(Flux2Transformer2DModel.from_pretrained(tmp_path / "tr").eval())
    with torch.no_grad():
        a, b = tr(**_inputs(1))[0], back(**_inputs(1))[0]
    assert torch.equal(a, b)
    return [b]


def check_model_attention_backend(install):
    tr = install(_tiny_transformer())
    tr.set_attention_backend("native")
    with torch.no_grad():
        a = tr(**_inputs(1))[0]
    tr.reset_attention_backend()
    return [a]


# ----------------------------------------------------------------------------- pipelines
def _klein(kind="klein", distilled=True):
    from diffusers import Flux2KleinKVPipeline, Flux2KleinPipeline

    from pipelines.tiny import get_tiny_flux2

    cls = Flux2KleinKVPipeline if kind == "kv" else Flux2KleinPipeline
    pipe = cls.from_pretrained(get_tiny_flux2(), is_distilled=distilled)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, **kw):
    args = dict(prompt="a red fox", num_inference_steps=2, height=64, width=64,
                max_sequence_length=32, output_type="pt",
                generator=torch.Generator().manual_seed(0))
    args.update(kw)
    return pipe(**args).images


def _image(seed, size=(64, 64)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def check_klein_sizes_and_batches(install):
    pipe = _klein()
    install(pipe.transformer)
    out = [_run(pipe, guidance_scale=1.0)]
    odd = _run(pipe, height=72, width=57, guidance_scale=1.0)
    assert odd.shape[-2:] == (72 - 72 % 8, 57 - 57 % 8)
    batch = _run(pipe, prompt=["a fox", "an owl"], num_images_per_prompt=2, guidance_scale=1.0)
    assert batch.shape[0] == 4
    return out + [odd, batch]


def check_klein_cfg_base_model(install):
    pipe = _klein(distilled=False)
    install(pipe.transformer)
    cfg = _run(pipe, guidance_scale=4.0)
    assert not torch.equal(cfg, _run(pipe, guidance_scale=1.0))
    return [cfg]


def check_klein_reference_image(install):
    pipe = _klein()
    install(pipe.transformer)
    return [_run(pipe, image=[_image(1)], guidance_scale=1.0),
            _run(pipe, image=[_image(1), _image(2, (64, 96))], guidance_scale=1.0)]


def check_klein_kv(install):
    pipe = _klein("kv")
    install(pipe.transformer)
    one = _run(pipe, image=_image(1))
    two = _run(pipe, image=[_image(1), _image(2, (96, 64))], prompt=["a fox", "an owl"])
    none = _run(pipe)
    assert not torch.equal(one, none)
    return [one, two, none]


def check_flux2_pipeline_prompt_embeds(install):
    """Flux2Pipeline (the dev layout: guidance embedding, references in the sequence at
    every step) driven by prompt embeddings, on the tiny preset's VAE and scheduler."""
    from diffusers import Flux2Pipeline

    klein = _klein()
    tr = install(_tiny_flux2_dev_transformer())
    pipe = Flux2Pipeline(scheduler=klein.scheduler, vae=klein.vae, text_encoder=None,
                         tokenizer=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    emb = torch.randn(2, 8, tr.config.joint_attention_dim, generator=torch.Generator().manual_seed(3))
    kw = dict(prompt=None, prompt_embeds=emb, guidance_scale=3.0)
    return [_run(pipe, **kw), _run(pipe, image=[_image(4)], **kw)]


def _tiny_flux2_dev_transformer():
    from diffusers import Flux2Transformer2DModel

    from pipelines.tiny_flux2 import tiny_flux2_transformer_config

    torch.manual_seed(1)
    return Flux2Transformer2DModel(**{**tiny_flux2_transformer_config(),
                                      "guidance_embeds": True}).eval()


# ----------------------------------------------------------------------------- LoRA
def _lora_config():
    from peft import LoraConfig

    # both layer types: the double blocks' projections and the single blocks' fused ones
    return LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                      target_modules=r".*(to_q|to_k|to_v|to_out\.0|add_q_proj|to_qkv_mlp_proj"
                                     r"|single_transformer_blocks\.\d+\.attn\.to_out)$")


def check_lora_pipeline(install, tmp_path):
    """add_adapter, save_lora_weights, load_lora_weights into a fresh pipeline (GSA
    installed before loading), set_adapters scale, fuse/unfuse, disable."""
    pytest.importorskip("peft")
    from diffusers import Flux2KleinPipeline
    from peft.utils import get_peft_model_state_dict

    src = _klein()
    base = _run(src, guidance_scale=1.0)
    torch.manual_seed(5)
    src.transformer.add_adapter(_lora_config())
    Flux2KleinPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(src.transformer))
    pipe = _klein()
    install(pipe.transformer)
    pipe.load_lora_weights(tmp_path, adapter_name="style")
    lora = _run(pipe, guidance_scale=1.0)
    assert not torch.allclose(lora, base, atol=1e-4)
    pipe.set_adapters(["style"], adapter_weights=[0.5])
    half = _run(pipe, guidance_scale=1.0)
    pipe.set_adapters(["style"], adapter_weights=[1.0])
    pipe.fuse_lora()
    fused = _run(pipe, guidance_scale=1.0)
    assert torch.allclose(fused, lora, atol=1e-4)
    pipe.unfuse_lora()
    pipe.disable_lora()
    off = _run(pipe, guidance_scale=1.0)
    assert torch.allclose(off, base, atol=1e-5)
    return [lora, half, fused, off]


CHECKS = {name[len("check_"):]: fn for name, fn in sorted(globals().items())
          if name.startswith("check_")}


# pipeline-level checks take seconds each on a 2-core CPU: behind --runslow
_SLOW = {"klein_sizes_and_batches", "klein_reference_image", "klein_cfg_base_model",
         "flux2_pipeline_prompt_embeds"}


def _run_check(check, installed, tmp_path):
    handles = []

    def install(tr):
        if installed == "gsa":
            handles.append(GroupSharedAttention(tr))
        return tr

    fn = CHECKS[check]
    tmp_path.mkdir(parents=True, exist_ok=True)
    args = (install, tmp_path) if fn.__code__.co_argcount == 2 else (install,)
    try:
        with torch.no_grad() if "checkpointing" not in check else torch.enable_grad():
            outs = fn(*args)
        if installed == "gsa":
            assert handles, "the check installed nothing"
            assert all(h.mode is None for h in handles)
    finally:
        for h in handles:
            h.remove()
    return [o.detach().clone() for o in outs]


@pytest.mark.parametrize("installed", ["stock", "gsa"])
@pytest.mark.parametrize("check", [pytest.param(c, marks=pytest.mark.slow) if c in _SLOW else c
                                   for c in CHECKS])
def test_flux2_dropin(check, installed, tmp_path):
    outs = _run_check(check, installed, tmp_path)
    if installed == "stock":
        _STOCK[check] = outs
        return
    # GSA installed must change nothing: bit-identical to the stock run
    stock = _STOCK.get(check) or _run_check(check, "stock", tmp_path / "stock")
    assert len(outs) == len(stock)
    for i, (a, b) in enumerate(zip(outs, stock)):
        assert torch.equal(a, b), f"{check}: output {i} differs with GSA installed " \
                                  f"(max {float((a - b).abs().max()):.3g})"


# ----------------------------------------------------------------------------- compile
def test_compiled_flux2_with_gsa_never_recompiles(tmp_path):
    """torch.compile(fullgraph=True) of a FLUX.2 transformer with GSA installed: no mode,
    replay (two caches, with and without ref_index), in_batch and record (pool: appending
    and a new cache) run without recompiling after their first call, and record gives
    the eager cache bit for bit."""
    torch._dynamo.reset()
    m = _set_kv(_tiny_transformer(double=2, single=2))
    gsa = GroupSharedAttention(m)
    x = _inputs(2, seed=8)
    refs = [dict(_inputs(2, seed=9 + i), timestep=torch.zeros(2)) for i in range(3)]
    no_recompile = torch._dynamo.config.patch(error_on_recompile=True)
    counter = CompileCounter()
    cm = torch.compile(m, backend=counter, fullgraph=True)
    try:
        with torch.no_grad():
            with no_recompile:
                assert torch.equal(cm(**x)[0], m(**x)[0])
                cm(**x)

            def record(model):
                a, b = ReferenceKVCache(), ReferenceKVCache()
                for r in refs[:2]:
                    with gsa.record(a):
                        model(**r)
                for r in (refs[2], refs[0]):  # same entry count: replay keeps its shapes
                    with gsa.record(b):
                        model(**r)
                return a, b

            eager = record(m)
            record(cm)  # compiles record mode
            with no_recompile:
                compiled = record(cm)
            for e, c in zip(eager, compiled):
                for layer in range(e.num_layers):
                    assert torch.equal(e.layer(layer)[0], c.layer(layer)[0])
            caches = compiled
            for ri in (None, torch.tensor([[0, 2], [1, -1]])):
                with gsa.replay(caches[0], ref_index=ri):
                    want = m(**x)[0]
                    got = cm(**x)[0]
                assert torch.allclose(got, want, atol=1e-5)
                with no_recompile:
                    for cache in caches:
                        with gsa.replay(cache, ref_index=ri):
                            cm(**x)
                            cm(**x)
            xi = _inputs(4, seed=3)
            with gsa.in_batch(2, 1):
                cm(**xi)
            with no_recompile:
                for _ in range(2):
                    with gsa.in_batch(2, 1):
                        cm(**xi)
                assert torch.equal(cm(**x)[0], m(**x)[0])  # back to no mode
        print(f"\n[flux2 compile] graphs compiled: {counter.frame_count} (no mode, record, replay, replay with "
              "ref_index, in_batch), recompiles after the first call of each: 0")
    finally:
        gsa.remove()
        torch._dynamo.reset()
