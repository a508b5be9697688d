"""Tiny offline presets (pipelines.tiny): they build without network, load back with the
real diffusers loading code, generate, and are bit-reproducible."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipelines import tiny


def _files(root):
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _assert_same_tree(a, b):
    fa, fb = _files(a), _files(b)
    assert fa == fb
    for rel in fa:
        if rel.endswith(".safetensors"):
            ta, tb = load_file(str(Path(a, rel))), load_file(str(Path(b, rel)))
            assert ta.keys() == tb.keys(), rel
            for k in ta:
                assert torch.equal(ta[k], tb[k]), f"{rel}:{k}"
        assert Path(a, rel).read_bytes() == Path(b, rel).read_bytes(), rel


@pytest.fixture(scope="module")
def flux_path(tmp_path_factory):
    return tiny.build_tiny_flux(tmp_path_factory.mktemp("tiny") / "flux", seed=0)


@pytest.fixture(scope="module")
def sdxl_path(tmp_path_factory):
    return tiny.build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "sdxl", seed=0)


def test_flux_layout(flux_path):
    index = json.loads(Path(flux_path, "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert Path(flux_path, sub).is_dir(), sub
    cfg = json.loads(Path(flux_path, "transformer", "config.json").read_text())
    want = tiny.tiny_flux_transformer_config()
    for k, v in want.items():
        assert cfg[k] == (list(v) if isinstance(v, tuple) else v), k
    assert sum(want["axes_dims_rope"]) == want["attention_head_dim"]
    vae_cfg = json.loads(Path(flux_path, "vae", "config.json").read_text())
    assert want["in_channels"] == 4 * vae_cfg["latent_channels"]


def test_flux_loads_and_generates(flux_path):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    pipe = FluxPipeline.from_pretrained(flux_path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer_max_length == tiny.TINY_MAX_SEQUENCE_LENGTH
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    out = pipe(
        ["a snowman meets a red fox", "the fox sleeps by the fire"],
        height=tiny.TINY_HEIGHT, width=tiny.TINY_WIDTH, num_inference_steps=2, guidance_scale=3.5,
        max_sequence_length=tiny.TINY_MAX_SEQUENCE_LENGTH, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (2, 64, 64, 3)
    assert np.isfinite(out).all()
    assert out.std() > 0.01  # not a constant image
    lat = pipe(
        "a snowman", height=64, width=64, num_inference_steps=1, guidance_scale=3.5,
        max_sequence_length=tiny.TINY_MAX_SEQUENCE_LENGTH, output_type="latent",
    ).images
    # packed latents: (64 / 4 / 2)^2 = 64 image tokens of 16 * 2 * 2 channels
    assert lat.shape == (1, 64, 64)
    assert torch.isfinite(lat).all()


def test_flux_transformer_config_builds_directly():
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**tiny.tiny_flux_transformer_config())
    cfg = tiny.tiny_flux_transformer_config()
    b, n_img, n_txt = 2, 16, 8
    with torch.no_grad():
        out = model(
            hidden_states=torch.randn(b, n_img, cfg["in_channels"]),
            encoder_hidden_states=torch.randn(b, n_txt, cfg["joint_attention_dim"]),
            pooled_projections=torch.randn(b, cfg["pooled_projection_dim"]),
            timestep=torch.full((b,), 0.5),
            guidance=torch.full((b,), 3.5),
            img_ids=torch.zeros(n_img, 3),
            txt_ids=torch.zeros(n_txt, 3),
        ).sample
    assert out.shape == (b, n_img, cfg["in_channels"])


def test_tokenizers_offline(flux_path):
    from transformers import AutoTokenizer

    clip = AutoTokenizer.from_pretrained(os.path.join(flux_path, "tokenizer"))
    t5 = AutoTokenizer.from_pretrained(os.path.join(flux_path, "tokenizer_2"))
    text = "A snowman meets a red fox in the forest; unknown-word Zebra 42!"
    for tok in (clip, t5):
        enc = tok([text, "fox"], padding="max_length", truncation=True, max_length=32, return_tensors="pt")
        assert enc.input_ids.shape == (2, 32)
        assert tok.eos_token_id in enc.input_ids[1].tolist()
    # known words are single CLIP tokens (bos, word, eos)
    assert all(len(clip(w).input_ids) == 3 for w in ("snowman", "fox", "forest", "watercolor"))
    assert clip.decode(clip("a snowman meets a fox", add_special_tokens=False).input_ids) == "a snowman meets a fox"


def test_sdxl_layout(sdxl_path):
    index = json.loads(Path(sdxl_path, "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    ip = Path(sdxl_path, tiny.SDXL_IP_ADAPTER_SUBFOLDER)
    assert (ip / tiny.SDXL_IP_ADAPTER_WEIGHT_NAME).is_file()
    assert (ip / tiny.SDXL_IMAGE_ENCODER_FOLDER / "config.json").is_file()
    assert (ip / tiny.SDXL_IMAGE_ENCODER_FOLDER / "preprocessor_config.json").is_file()
    sd = load_file(str(ip / tiny.SDXL_IP_ADAPTER_WEIGHT_NAME))
    cross = tiny.tiny_sdxl_unet_config()["cross_attention_dim"]
    assert sd["image_proj.proj.weight"].shape == (tiny.SDXL_IP_ADAPTER_NUM_TOKENS * cross, 32)
    ids = sorted(int(k.split(".")[1]) for k in sd if k.endswith("to_k_ip.weight"))
    assert ids == list(range(1, 2 * len(ids), 2)) and len(ids) == 7


def test_sdxl_ip_adapter_loads_and_generates(sdxl_path):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_path)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(
        sdxl_path, subfolder="ip_adapter", weight_name="ip-adapter_tiny.safetensors",
        image_encoder_folder="image_encoder",
    )
    assert pipe.image_encoder is not None and pipe.feature_extractor is not None
    procs = pipe.unet.attn_processors
    ip_procs = {n: p for n, p in procs.items() if isinstance(p, IPAdapterAttnProcessor2_0)}
    assert len(ip_procs) == 7 and all(n.endswith("attn2.processor") for n in ip_procs)
    # the weights in the file are the ones installed, in diffusers' enumeration order
    sd = load_file(str(Path(sdxl_path, "ip_adapter", "ip-adapter_tiny.safetensors")))
    for i, p in enumerate(ip_procs.values()):
        assert torch.equal(p.to_k_ip[0].weight, sd[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"])
        assert torch.equal(p.to_v_ip[0].weight, sd[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"])
        assert p.num_tokens == [tiny.SDXL_IP_ADAPTER_NUM_TOKENS]

    red = Image.new("RGB", (64, 64), (220, 40, 40))
    blue = Image.new("RGB", (48, 48), (20, 40, 220))
    kw = dict(height=64, width=64, num_inference_steps=2, output_type="np")

    def run(scale, image):
        pipe.set_ip_adapter_scale(scale)
        return pipe("a snowman meets a fox", ip_adapter_image=image,
                    generator=torch.Generator().manual_seed(0), **kw).images

    a = run(0.5, red)
    assert a.shape == (1, 64, 64, 3) and np.isfinite(a).all() and a.std() > 0.01
    b = run(0.5, [[red, blue]])  # two reference images through one adapter
    assert b.shape == a.shape and np.isfinite(b).all()
    c = run(0.0, red)
    assert np.abs(a - b).max() > 0 and np.abs(a - c).max() > 0  # the adapter is wired in


def test_builds_are_bit_identical(tmp_path, flux_path, sdxl_path):
    _assert_same_tree(flux_path, tiny.build_tiny_flux(tmp_path / "flux2", seed=0))
    _assert_same_tree(sdxl_path, tiny.build_tiny_sdxl(tmp_path / "sdxl2", seed=0))
    other = load_file(str(Path(tiny.build_tiny_flux(tmp_path / "flux3", seed=1),
                               "transformer", "diffusion_pytorch_model.safetensors")))
    base = load_file(str(Path(flux_path, "transformer", "diffusion_pytorch_model.safetensors")))
    assert any(not torch.equal(base[k], other[k]) for k in base)


def test_build_keeps_global_rng(tmp_path):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    tiny.build_tiny_flux(tmp_path / "f", seed=0)
    assert torch.equal(state, torch.get_rng_state())


def test_build_refuses_non_empty_target(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        tiny.build_tiny_flux(tmp_path / "x")


def test_cache_builds_once_and_replaces_partial(tmp_path, monkeypatch):
    monkeypatch.setenv("STORYATTN_TINY_DIR", str(tmp_path / "env_root"))
    assert tiny.default_cache_root() == tmp_path / "env_root"
    # a half-written folder (no completion marker) is rebuilt, never used
    partial = tmp_path / "env_root" / tiny.TINY_FLUX_DIRNAME
    partial.mkdir(parents=True)
    (partial / "model_index.json").write_text("{")
    p = tiny.get_tiny_flux()
    assert p == str(partial)
    assert json.loads(Path(p, "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    mtime = Path(p, "model_index.json").stat().st_mtime_ns
    assert tiny.get_tiny_flux() == p  # second call: no rebuild
    assert Path(p, "model_index.json").stat().st_mtime_ns == mtime
    # no temporary folders left behind
    assert sorted(os.listdir(tmp_path / "env_root")) == [tiny.TINY_FLUX_DIRNAME]
    # an explicit cache_dir wins over the environment
    q = tiny.get_tiny_flux(cache_dir=tmp_path / "explicit")
    assert Path(q).parent == tmp_path / "explicit"


def test_cli(tmp_path, capsys):
    assert tiny.main(["--out", str(tmp_path), "--only", "sdxl"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / tiny.TINY_SDXL_DIRNAME) in out and "load_ip_adapter" in out
    assert (tmp_path / tiny.TINY_SDXL_DIRNAME / "model_index.json").is_file()
