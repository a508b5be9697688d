"""GroupSharedAttention.record_images (images in, filled ReferenceKVCache out) and the
clean-reference contract of record mode, on the tiny FLUX preset.

* record_images equals, bit for bit, the recording the Story-Iter FLUX backbone did
  before it existed (VAE mode + shift/scale, diffusers' private _pack_latents /
  _prepare_latent_image_ids, one transformer forward at timestep 0 per batch), kept
  below as the reference; and the backbone's round cache is that same recording;
* PIL images and [0, 1] tensors give the same cache; batch size does not change it;
* pack_latents / latent_image_ids equal FluxPipeline's private helpers;
* record mode refuses a forward at a non-zero timestep, and a whole pipe(...) call,
  with one line naming record_images, and leaves the cache unchanged.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from storyattn import GroupSharedAttention, ReferenceKVCache  # noqa: E402
from storyattn.references import latent_image_ids, pack_latents  # noqa: E402

SIZE = 64
SEQ = 32


@pytest.fixture(scope="module")
def flux_path(tmp_path_factory):
    from pipelines.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tinyflux") / "flux")


@pytest.fixture(scope="module")
def pipe(flux_path):
    from diffusers import FluxPipeline

    p = FluxPipeline.from_pretrained(flux_path)
    p.set_progress_bar_config(disable=True)
    return p


def _images(n, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
            for _ in range(n)]


def _former_recording(pipe, gsa, images, prompts, batch, guidance=3.5):
    """The Story-Iter FLUX backbone's recording code from before record_images existed."""
    cache = ReferenceKVCache()
    cache.reserve(len(images))
    dtype, device = pipe.transformer.dtype, pipe.transformer.device
    with torch.no_grad():
        for s in range(0, len(images), batch):
            chunk, texts = images[s:s + batch], prompts[s:s + batch]
            px = pipe.image_processor.preprocess(chunk, height=SIZE, width=SIZE)
            px = px.to(device=device, dtype=pipe.vae.dtype)
            lat = pipe.vae.encode(px).latent_dist.mode()
            lat = (lat - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
            n, c, h, w = lat.shape
            packed = pipe._pack_latents(lat.to(dtype), n, c, h, w)
            embeds, pooled, text_ids = pipe.encode_prompt(prompt=texts, prompt_2=None,
                                                          device=device, max_sequence_length=SEQ)
            img_ids = pipe._prepare_latent_image_ids(n, h // 2, w // 2, device, dtype)
            g = torch.full((n,), guidance, device=device, dtype=torch.float32)
            with gsa.record(cache):
                pipe.transformer(hidden_states=packed, timestep=torch.zeros(n, dtype=dtype),
                                 guidance=g, pooled_projections=pooled,
                                 encoder_hidden_states=embeds, txt_ids=text_ids,
                                 img_ids=img_ids, return_dict=False)
    return cache


def _assert_same(a: ReferenceKVCache, b: ReferenceKVCache):
    assert len(a) == len(b) and a.signature == b.signature
    for layer in range(a.num_layers):
        for x, y in zip(a.layer(layer), b.layer(layer)):
            assert torch.equal(x, y), f"layer {layer} differs"


def test_pack_and_ids_equal_flux_pipeline():
    from diffusers import FluxPipeline

    lat = torch.randn(2, 16, 6, 10)
    assert torch.equal(pack_latents(lat), FluxPipeline._pack_latents(lat, 2, 16, 6, 10))
    assert torch.equal(latent_image_ids(6, 10, "cpu", torch.bfloat16),
                       FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.bfloat16))
    with pytest.raises(ValueError, match="not even"):
        pack_latents(torch.randn(1, 16, 5, 4))


def test_record_images_equals_former_recording_bitwise(pipe):
    gsa = GroupSharedAttention(pipe.transformer)
    try:
        imgs = _images(3)
        prompts = ["a snowman", "a fox in the snow", ""]
        old = _former_recording(pipe, gsa, imgs, prompts, batch=2)
        new = gsa.record_images(pipe, imgs, prompts, height=SIZE, width=SIZE, batch_size=2,
                                max_sequence_length=SEQ)
        _assert_same(new, old)
        assert new.num_image_tokens == (SIZE // 8) ** 2
        # batch size does not change the entries; [0, 1] tensors equal PIL images
        t = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255
                         for im in imgs])
        one_by_one = gsa.record_images(pipe, t, prompts, batch_size=1, max_sequence_length=SEQ)
        for layer in range(new.num_layers):
            for x, y in zip(new.layer(layer), one_by_one.layer(layer)):
                assert (x - y).abs().max() <= 1e-5 * y.abs().max()
        # appending to a cache continues its entry numbers (placement i + 1)
        more = gsa.record_images(pipe, imgs[:2], prompts[:2], max_sequence_length=SEQ)
        gsa.record_images(pipe, imgs[2], prompts[2], cache=more, max_sequence_length=SEQ)
        assert len(more) == 3
        for layer in range(new.num_layers):
            assert (more.layer(layer)[0] - new.layer(layer)[0]).abs().max() <= 1e-5
        # replace=True starts over
        gsa.record_images(pipe, imgs[0], cache=more, replace=True, max_sequence_length=SEQ)
        assert len(more) == 1
    finally:
        gsa.remove()


def test_story_backbone_records_through_record_images(flux_path):
    """The FLUX backbone's round cache equals the former recording (its own placement)."""
    from pipelines.backbones.flux import FluxBackbone

    bb = FluxBackbone(flux_path, height=SIZE, width=SIZE, steps=1, step_progress=False,
                      record_batch=2)
    bb.load()
    imgs = _images(3, seed=1)
    prompts = ["frame one", "frame two", "the fox"]
    info = bb.begin_round(imgs, 0.3, ref_prompts=prompts)
    try:
        assert info["num_refs"] == 3 and bb.encoder_images == 3 and bb.record_forwards == 2
        assert bb.max_seq == SEQ
        old = _former_recording(bb.pipe, bb.gsa, imgs, prompts, batch=2)
        _assert_same(bb.cache, old)
    finally:
        bb.end_round()


def test_record_refuses_noisy_timesteps_and_pipeline_calls(pipe):
    gsa = GroupSharedAttention(pipe.transformer)
    try:
        cache = gsa.record_images(pipe, _images(1), max_sequence_length=SEQ)
        before = [t.clone() for t in cache.layer(0)]
        with gsa.record(cache), pytest.raises(ValueError) as e:
            pipe("a fox", height=SIZE, width=SIZE, num_inference_steps=2,
                 max_sequence_length=SEQ, output_type="latent")
        msg = str(e.value)
        assert "\n" not in msg and "record_images" in msg and "timestep 0" in msg
        assert "pipe(...)" in msg
        assert len(cache) == 1 and all(torch.equal(a, b) for a, b in zip(before, cache.layer(0)))
        # a direct forward at sigma 0.5 is refused the same way
        x = dict(hidden_states=torch.randn(1, 64, 64), encoder_hidden_states=torch.randn(1, 4, 32),
                 pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
                 img_ids=latent_image_ids(16, 16), txt_ids=torch.zeros(4, 3),
                 guidance=torch.tensor([3.5]))
        with gsa.record(cache), torch.no_grad(), pytest.raises(ValueError, match="record_images"):
            pipe.transformer(**x)
        assert len(cache) == 1
        # bad inputs to record_images: one line each
        with pytest.raises(ValueError, match="prompts must be None, a string or 2 strings"):
            gsa.record_images(pipe, _images(2), ["only one"])
        with pytest.raises(ValueError, match="no images given"):
            gsa.record_images(pipe, [])
        with pytest.raises(ValueError, match=r"\[3, H, W\] or \[N, 3, H, W\]"):
            gsa.record_images(pipe, torch.rand(SIZE, SIZE))
    finally:
        gsa.remove()
    other = GroupSharedAttention(__import__("test_gsa_processor").tiny_flux())
    with pytest.raises(ValueError, match="not the transformer"):
        other.record_images(pipe, _images(1))
