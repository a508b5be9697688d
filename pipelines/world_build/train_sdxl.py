"""The world's SDXL models: a text-to-image UNet and an IP-Adapter trained on it (base frozen).

Three build stages (registered after the FLUX stages by :mod:`.build`):

==============  ==================================================================================
sdxl_base       ``UNet2DConditionModel`` (the tiny SDXL layout of :mod:`pipelines.tiny`, 16 latent
                channels) trained text-to-image with the denoising loss of the pipeline's own
                scheduler (``DDPMScheduler`` built from its config: the same betas, so the same
                ``alphas_cumprod`` that ``EulerDiscreteScheduler`` samples with; SDXL's betas
                rescaled to zero terminal SNR, v-prediction, see the scheduler's comment).  The VAE is
                the world's FLUX VAE (4x, 16 channels): SDXL's pipeline scales latents by
                ``scaling_factor`` only, which is what this stage trains on.  The text encoders
                are the tiny CLIP pair at seeded random weights, frozen.  Captions are dropped
                to *zero* embeddings (``force_zeros_for_empty_prompt``: the pipeline's
                unconditional branch), so classifier-free guidance has a trained negative.
sdxl_ip         an IP-Adapter on the frozen base: image projection (``ImageProjection``, 4
                tokens), ``to_k_ip`` / ``to_v_ip`` of every cross-attention layer (initialised
                from the layer's ``to_k`` / ``to_v``, as the IP-Adapter paper does) and the CLIP
                image encoder, trained jointly.  Pairs: a lone big reference of a character
                (training identities) -> a frame of that character in another scene, slot and
                size.  Image embeddings are zeroed with probability 0.1 (the zero negative that
                diffusers' IP-Adapter uses under CFG).
sdxl_export     the pipeline folder with the adapter (``ip_adapter/ip-adapter_world.safetensors``
                in the original layout ``image_proj.*`` / ``ip_adapter.{k}.to_k_ip``, and
                ``ip_adapter/image_encoder/``) copied into the committed weights as ``sdxl/``.
==============  ==================================================================================

A random frozen image encoder (the tiny preset's) is not used: its 32 embedding numbers of a
32x32 thumbnail were not trained to keep colour, pattern and accessory apart, so the encoder
trains with the projection (its own learning rate, lower).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from ..world import data as D
from ..world import render as R
from ..model_presets import build_world_sdxl_pipeline, images_to_tensor, seeded
from ..world.weights import IMAGE_ENCODER_FOLDER, IP_SUBFOLDER, IP_WEIGHT_NAME, ip_adapter_kwargs
from .train_base import _bar, _cosine, _track, _update

__all__ = ["train_sdxl_base", "train_sdxl_ip_adapter", "TIME_IDS"]

IP_TOKENS = 4
IMAGE_SIZE = 32                       # the encoder's input: frames resized 64 -> 32
# SDXL's micro-conditioning for a 64x64 frame: original size, crop corner, target size
TIME_IDS = (64.0, 64.0, 0.0, 0.0, 64.0, 64.0)


@torch.no_grad()
def _encode_text(pipe, prompts: List[str], device, batch: int = 256):
    """(embeds [N, L, 96], pooled [N, 32]) of the frozen encoders, as the pipeline computes them."""
    embs, pooled = [], []
    for s in range(0, len(prompts), batch):
        e, _, p, _ = pipe.encode_prompt(prompts[s:s + batch], device=device,
                                        num_images_per_prompt=1,
                                        do_classifier_free_guidance=False)
        embs.append(e)
        pooled.append(p)
    return torch.cat(embs), torch.cat(pooled)


@torch.no_grad()
def _latents(vae, images, device) -> torch.Tensor:
    pix = images_to_tensor(images)
    out = [vae.encode(pix[i:i + 256].to(device)).latent_dist.mode()
           for i in range(0, len(pix), 256)]
    return torch.cat(out) * vae.config.scaling_factor


class _EpsLoss:
    """The denoising loss of the pipeline's scheduler (its betas and prediction type: noise,
    or v = sqrt(a) noise - sqrt(1 - a) x0)."""

    def __init__(self, pipe, device):
        from diffusers import DDPMScheduler

        self.sched = DDPMScheduler.from_config(pipe.scheduler.config)
        self.n = self.sched.config.num_train_timesteps
        self.time_ids = torch.tensor(TIME_IDS, device=device)

    def __call__(self, unet, x0, emb, pooled, g, image_embeds=None):
        b = len(x0)
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        t = torch.randint(0, self.n, (b,), generator=g).to(x0.device)
        xt = self.sched.add_noise(x0, noise, t)
        cond = {"text_embeds": pooled, "time_ids": self.time_ids.expand(b, -1)}
        if image_embeds is not None:
            cond["image_embeds"] = [image_embeds[:, None]]
        pred = unet(xt, t, encoder_hidden_states=emb, added_cond_kwargs=cond).sample
        target = (self.sched.get_velocity(x0, noise, t)
                  if self.sched.config.prediction_type == "v_prediction" else noise)
        return (pred - target).pow(2).mean()


def _drop(x: torch.Tensor, p: float, g) -> torch.Tensor:
    keep = (torch.rand(len(x), generator=g) >= p).to(x.device, x.dtype)
    return x * keep.view(-1, *([1] * (x.ndim - 1)))


def train_sdxl_base(pipe, steps: int, batch: int, seed: int, device, lr: float = 1e-3,
                    n_frames: int = 4096, caption_dropout: float = 0.1,
                    described_share: float = 0.0,
                    log: Optional[Callable] = None) -> Dict[str, float]:
    """Train ``pipe.unet`` (full weights) in place, text-to-image; a ``described_share`` of
    the captions say each character's look instead of its name (see stage_sdxl_base)."""
    frames = D.make_base_frames(n_frames, seed=seed + 101, described_share=described_share)
    pipe.text_encoder.to(device)
    pipe.text_encoder_2.to(device)
    emb, pooled = _encode_text(pipe, [f[1] for f in frames], device)
    lat = _latents(pipe.vae.to(device), [f[0] for f in frames], device)
    unet = pipe.unet.to(device).train()
    unet.requires_grad_(True)
    loss_fn = _EpsLoss(pipe, device)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, 50))
    g = torch.Generator().manual_seed(seed + 102)
    return _loop("sdxl_base", steps, unet, opt, sched, log, lambda: _base_step(
        unet, loss_fn, lat, emb, pooled, batch, caption_dropout, g), lambda: unet.eval()
        .requires_grad_(False), extra={"batch": batch, "frames": n_frames,
                                       "described_share": described_share})


def _base_step(unet, loss_fn, lat, emb, pooled, batch, p_drop, g):
    idx = torch.randint(0, len(lat), (batch,), generator=g)
    drop = (torch.rand(batch, generator=g) < p_drop).to(lat.device)
    e = torch.where(drop[:, None, None], torch.zeros_like(emb[idx]), emb[idx])
    p = torch.where(drop[:, None], torch.zeros_like(pooled[idx]), pooled[idx])
    return loss_fn(unet, lat[idx], e, p, g)


def _loop(name, steps, module, opt, sched, log, step_fn, finish, extra) -> Dict[str, float]:
    """``steps`` optimizer steps of ``step_fn()``'s loss (gradients clipped over ``module``,
    whose frozen parameters have none)."""
    bar = _bar(steps, name)
    t0 = time.perf_counter()
    hist: List[float] = []
    for step in range(steps):
        loss = step_fn()
        _update(loss, module, opt, sched)
        _track(bar, hist, float(loss.detach()), name, "loss", step, log, 100)
    bar.close()
    finish()
    k = max(1, min(50, steps // 10))
    return {"steps": steps, **extra, "first_loss": float(np.mean(hist[:k])),
            "final_loss": float(np.mean(hist[-k:])), "time_s": round(time.perf_counter() - t0, 1)}


# ---- IP-Adapter -----------------------------------------------------------------------------


def init_ip_adapter(folder, unet, seed: int = 0) -> None:
    """Write an untrained adapter (and image encoder) under ``folder/ip_adapter/``."""
    from diffusers.models.embeddings import ImageProjection
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    ip_dir = Path(folder) / IP_SUBFOLDER
    with seeded(seed * 1000 + 211):
        enc = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=64, intermediate_size=128, projection_dim=64, num_hidden_layers=2,
            num_attention_heads=4, num_channels=3, image_size=IMAGE_SIZE, patch_size=4,
            hidden_act="quick_gelu"))
    enc.eval().save_pretrained(str(ip_dir / IMAGE_ENCODER_FOLDER), safe_serialization=True)
    # frames are square: resize to the encoder's size, no crop loss
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
                       ).save_pretrained(str(ip_dir / IMAGE_ENCODER_FOLDER))
    cross = unet.config.cross_attention_dim
    with seeded(seed * 1000 + 212):
        proj = ImageProjection(image_embed_dim=enc.config.projection_dim, cross_attention_dim=cross,
                               num_image_text_embeds=IP_TOKENS)
    t = {"image_proj.proj.weight": proj.image_embeds.weight, "image_proj.proj.bias":
         proj.image_embeds.bias, "image_proj.norm.weight": proj.norm.weight,
         "image_proj.norm.bias": proj.norm.bias}
    for key_id, attn in _cross_attentions(unet):
        t[f"ip_adapter.{key_id}.to_k_ip.weight"] = attn.to_k.weight
        t[f"ip_adapter.{key_id}.to_v_ip.weight"] = attn.to_v.weight
    save_file({k: v.detach().clone().contiguous() for k, v in t.items()},
              str(ip_dir / IP_WEIGHT_NAME), metadata={"format": "pt"})


def _cross_attentions(unet):
    """(key id, Attention) of the cross-attention layers in the numbering of the original
    adapter files (odd ids, attn_processors order; diffusers' loader counts the same way)."""
    key_id = 1
    for name in unet.attn_processors.keys():
        if name.endswith("attn1.processor"):
            continue
        yield key_id, unet.get_submodule(name[: -len(".processor")])
        key_id += 2


def save_ip_adapter(pipe, folder) -> None:
    """The trained adapter back in the original layout, plus the image encoder."""
    from safetensors.torch import save_file

    ip_dir = Path(folder) / IP_SUBFOLDER
    proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    t = {"image_proj.proj.weight": proj.image_embeds.weight, "image_proj.proj.bias":
         proj.image_embeds.bias, "image_proj.norm.weight": proj.norm.weight,
         "image_proj.norm.bias": proj.norm.bias}
    for key_id, attn in _cross_attentions(pipe.unet):
        t[f"ip_adapter.{key_id}.to_k_ip.weight"] = attn.processor.to_k_ip[0].weight
        t[f"ip_adapter.{key_id}.to_v_ip.weight"] = attn.processor.to_v_ip[0].weight
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in t.items()},
              str(ip_dir / IP_WEIGHT_NAME), metadata={"format": "pt"})
    pipe.image_encoder.to("cpu").save_pretrained(str(ip_dir / IMAGE_ENCODER_FOLDER),
                                                 safe_serialization=True)


def make_ip_pairs(n: int, seed: int, pool, posed_share: float = 0.0) -> List[tuple]:
    """n (reference image, frame image, frame prompt): the reference is a lone big centred
    character in a random scene (as a story's reference), the frame the same character alone
    in another random scene, slot and size.  In a share ``posed_share`` the reference is itself
    such a frame (any slot and size), as Story-Iter's later rounds read the previous round's
    frames: the adapter learns to take the look and leave the size and slot to the prompt."""
    rng = np.random.default_rng([seed, 31])
    # a stream of its own, so posed_share=0 draws exactly the pairs it always drew
    rng_posed = np.random.default_rng([seed, 37])
    out = []
    for _ in range(n):
        ident = pool[rng.integers(len(pool))]
        ref_scene = list(R.SCENES)[rng.integers(len(R.SCENES))]
        place = R.Placement(ident, "centre", "big")
        if posed_share > 0 and rng_posed.random() < posed_share:
            _, ((rsize, rpos),) = D.random_frame(rng_posed, 1)
            place = R.Placement(ident, rpos, rsize)
        ref = R.render_frame(ref_scene, [place])
        scene, places = D.random_frame(rng, 1)
        (size, pos), = places
        name = D.NAMES[rng.integers(len(D.NAMES))]
        img = R.render_frame(scene, [R.Placement(ident, pos, size)])
        out.append((ref, img, D.frame_prompt(scene, [(name, size, pos)])))
    return out


def train_sdxl_ip_adapter(pipe, steps: int, batch: int, seed: int, device, pool,
                          lr: float = 1e-3, enc_lr: float = 3e-4, n_pairs: int = 2048,
                          image_dropout: float = 0.1, caption_dropout: float = 0.05,
                          posed_share: float = 0.0,
                          log: Optional[Callable] = None) -> Dict[str, float]:
    """Train the adapter loaded on ``pipe`` (and its image encoder); the base stays frozen."""
    pairs = make_ip_pairs(n_pairs, seed + 111, pool, posed_share=posed_share)
    pipe.text_encoder.to(device)
    pipe.text_encoder_2.to(device)
    emb, pooled = _encode_text(pipe, [p[2] for p in pairs], device)
    lat = _latents(pipe.vae.to(device), [p[1] for p in pairs], device)
    px = pipe.feature_extractor([p[0] for p in pairs], return_tensors="pt").pixel_values.to(device)
    unet, enc = pipe.unet.to(device), pipe.image_encoder.to(device)
    unet.requires_grad_(False).eval()
    ip_params = list(unet.encoder_hid_proj.parameters())
    for _, attn in _cross_attentions(unet):
        ip_params += list(attn.processor.to_k_ip.parameters()) + list(
            attn.processor.to_v_ip.parameters())
    for p in ip_params:
        p.requires_grad_(True)
    enc.requires_grad_(True).train()
    opt = torch.optim.AdamW([{"params": ip_params, "lr": lr},
                             {"params": list(enc.parameters()), "lr": enc_lr}], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, 50))
    loss_fn = _EpsLoss(pipe, device)
    g = torch.Generator().manual_seed(seed + 112)

    def step():
        idx = torch.randint(0, len(lat), (batch,), generator=g)
        img_emb = _drop(enc(px[idx]).image_embeds, image_dropout, g)
        return loss_fn(unet, lat[idx], _drop(emb[idx], caption_dropout, g), pooled[idx], g,
                       image_embeds=img_emb)

    def finish():
        enc.eval().requires_grad_(False)
        unet.requires_grad_(False)

    n_trained = sum(p.numel() for p in ip_params) + sum(p.numel() for p in enc.parameters())
    return _loop("sdxl_ip", steps, torch.nn.ModuleList([unet, enc]), opt, sched, log, step,
                 finish, extra={"batch": batch, "pairs": n_pairs, "posed_share": posed_share,
                                "trained_params": n_trained,
                                "image_encoder": "trained jointly"})


# ---- build stages ---------------------------------------------------------------------------


def _world_vae(ctx) -> Path:
    """The world VAE: this build's stage vae, else the one in --weights, else the committed
    one (an SDXL-only build)."""
    from ..world import weights as W

    own = ctx.out / "vae"
    if (own / "config.json").is_file():
        return own
    root = ctx.weights if W.available(ctx.weights) else W.WEIGHTS_DIR
    return Path(W.flux_path(root)) / "vae"


def stage_sdxl_base(ctx) -> Dict[str, float]:
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    tmp = ctx.out / "sdxl_base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae = AutoencoderKL.from_pretrained(str(_world_vae(ctx)))
    build_world_sdxl_pipeline(tmp, vae, seed=ctx.seed)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp), local_files_only=True)
    torch.manual_seed(ctx.seed)
    s = ctx.settings
    # all cores, as the FLUX stages: on an idle 2-core CPU a step takes 0.12 s against 0.19 s
    # on one thread (on a shared CPU, run the build with OMP_NUM_THREADS=1: docs/world.md)
    res = train_sdxl_base(pipe, s["sdxl_base_steps"], s["sdxl_base_batch"], ctx.seed,
                          ctx.device, described_share=s["sdxl_described_percent"] / 100,
                          log=ctx.log)
    pipe.to("cpu").save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(ctx.out / "sdxl_base", ignore_errors=True)
    tmp.rename(ctx.out / "sdxl_base")
    return res


def load_world_sdxl(path, ip_adapter: bool = True, device="cpu"):
    """StableDiffusionXLPipeline from a world folder, with its IP-Adapter loaded (scale 1)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(path), local_files_only=True)
    if ip_adapter:
        pipe.load_ip_adapter(**ip_adapter_kwargs(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def stage_sdxl_ip(ctx) -> Dict[str, float]:
    tmp = ctx.out / "sdxl_ip.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ctx.out / "sdxl_base", tmp)
    from diffusers import UNet2DConditionModel

    init_ip_adapter(tmp, UNet2DConditionModel.from_pretrained(str(tmp / "unet")), seed=ctx.seed)
    pipe = load_world_sdxl(tmp)
    train, _ = D.split_identities(ctx.seed)
    torch.manual_seed(ctx.seed)
    s = ctx.settings
    res = train_sdxl_ip_adapter(pipe, s["sdxl_ip_steps"], s["sdxl_ip_batch"], ctx.seed,
                                ctx.device, train, posed_share=s["sdxl_ip_posed_percent"] / 100,
                                log=ctx.log)
    save_ip_adapter(pipe, tmp)
    shutil.rmtree(ctx.out / "sdxl_ip", ignore_errors=True)
    tmp.rename(ctx.out / "sdxl_ip")
    return res


def stage_sdxl_export(ctx) -> Dict[str, float]:
    from ..world import weights as W

    dst = ctx.weights / W.SDXL_DIR
    tmp = ctx.weights / (W.SDXL_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ctx.out / "sdxl_ip", tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    (ctx.out / "sdxl_export.done").write_text("done\n")
    # the SDXL stages' figures join the committed build.json (written by stage export)
    info = ctx.weights / W.BUILD_FILE
    if info.is_file():
        rec = json.loads(info.read_text())
        rec.setdefault("stages", {}).update({k: v for k, v in ctx.results.items()
                                             if k.startswith("sdxl_")})
        rec.setdefault("settings", {}).update({k: v for k, v in ctx.settings.items()
                                               if k.startswith("sdxl_")})
        info.write_text(json.dumps(rec, indent=1) + "\n")
    return {"weights": str(dst), "bytes": sum(p.stat().st_size for p in dst.rglob("*")
                                              if p.is_file())}
