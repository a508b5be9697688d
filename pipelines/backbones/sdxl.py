"""SDXL + IP-Adapter backbone of Story-Iter (the published method), driven by GRCA.

Per round: the N reference frames (round r-1, plus any character reference images) go
through the CLIP image encoder once (N encoder images, counted), the adapter's projection
turns each into T tokens, and :meth:`GRCAHandle.references` computes every IP layer's
reference K/V once.  Frames are then drawn in batches with the stock
``StableDiffusionXLPipeline.__call__`` (prompts only; per-frame generators); every frame,
step and both CFG branches read the same per-layer pool.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from pipelines.lora_files import load_lora_files
from storyattn.grca import install_global_reference_attention

__all__ = ["SDXLBackbone", "resolve_ip_adapter"]


def resolve_ip_adapter(ip_adapter: str, image_encoder: Optional[str]):
    """``(folder, weight_name, image_encoder_folder)`` for a local adapter weights file."""
    p = Path(ip_adapter)
    if p.is_dir():
        cands = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin"))
        if len(cands) != 1:
            raise FileNotFoundError(f"--ip-adapter {ip_adapter}: give the weights file; the folder "
                                    f"holds {len(cands)} candidates")
        p = cands[0]
    if not p.is_file():
        raise FileNotFoundError(f"--ip-adapter {ip_adapter}: file not found")
    enc = Path(image_encoder) if image_encoder else p.parent / "image_encoder"
    if not (enc / "config.json").is_file():
        raise FileNotFoundError(
            f"image encoder folder {enc} not found (a CLIPVisionModelWithProjection folder with "
            "config.json); pass --image-encoder PATH")
    return str(p.parent), p.name, str(enc)


class SDXLBackbone:
    """Loads the pipeline and draws frames; see the module docstring."""

    name = "sdxl"

    def __init__(self, model: str, ip_adapter: str, image_encoder: Optional[str],
                 loras: Sequence[str] = (), device: str = "cpu", dtype=torch.float32,
                 height: int = 1024, width: int = 1024, steps: int = 50, guidance: float = 5.0,
                 step_progress: bool = True):
        self.model, self.device, self.dtype = model, device, dtype
        self.ip_dir, self.ip_weight, self.encoder_dir = resolve_ip_adapter(ip_adapter, image_encoder)
        self.loras = list(loras)
        self.height, self.width, self.steps, self.guidance = height, width, steps, guidance
        self.step_progress = step_progress
        self.encoder_images = 0      # images through the CLIP image encoder (all rounds)
        self.encoder_forwards = 0    # encoder forward calls (batched)
        self._round: Optional[contextlib.ExitStack] = None
        self._state = None
        self.pipe = None
        self.handle = None
        self._char_embeds: Optional[torch.Tensor] = None
        # sampling options (see presets.configure_backbone); these values are today's defaults
        self.scheduler = "model"          # model | ddim | euler
        self.negative_prompt: Optional[str] = None   # None: zero embeddings (stock default)
        self.ref_size: Optional[int] = None          # resize references to ref_size^2 first
        self.vae_fp32 = False

    # -- loading ----------------------------------------------------------------------------
    def load(self) -> None:
        from diffusers import StableDiffusionXLPipeline
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        pipe = StableDiffusionXLPipeline.from_pretrained(self.model, dtype=self.dtype)
        enc = CLIPVisionModelWithProjection.from_pretrained(self.encoder_dir, dtype=self.dtype)
        if (Path(self.encoder_dir) / "preprocessor_config.json").is_file():
            fe = CLIPImageProcessor.from_pretrained(self.encoder_dir)
        else:
            fe = CLIPImageProcessor()
        pipe.register_modules(image_encoder=enc, feature_extractor=fe)
        pipe.load_ip_adapter(self.ip_dir, subfolder="", weight_name=self.ip_weight,
                             image_encoder_folder=None)
        load_lora_files(pipe, self.loras, "sdxl")
        from pipelines.backbones.sampling import prepare_pipe

        prepare_pipe(pipe, self, "sdxl")
        self.pipe = pipe
        self.handle = install_global_reference_attention(pipe.unet)
        from diffusers.models.embeddings import ImageProjection

        proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
        self._plain_adapter = isinstance(proj, ImageProjection)

    # -- references -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: List, chunk: int = 16):
        """CLIP image embeddings of ``images`` (one encoder pass per image, in chunks).

        Returns ``(embeds, negative)``; plain adapters use ``image_embeds`` and a zero
        negative (as diffusers does), Plus adapters the penultimate hidden states and the
        encoder's output for a black image."""
        enc = self.pipe.image_encoder
        if self.ref_size:
            # the official loop resizes each frame (PIL's default filter, bicubic) before the
            # encoder's own resize/crop, which then sees a 256x256 picture
            from PIL import Image

            size = (self.ref_size, self.ref_size)
            images = [im.resize(size, Image.Resampling.BICUBIC) for im in images]
        outs = []
        for s in range(0, len(images), chunk):
            px = self.pipe.feature_extractor(images[s:s + chunk], return_tensors="pt").pixel_values
            px = px.to(device=self.device, dtype=self.dtype)
            if self._plain_adapter:
                outs.append(enc(px).image_embeds)
            else:
                outs.append(enc(px, output_hidden_states=True).hidden_states[-2])
            self.encoder_forwards += 1
        self.encoder_images += len(images)
        emb = torch.cat(outs)
        if self._plain_adapter:
            neg = torch.zeros_like(emb[:1])
        else:
            neg = enc(torch.zeros_like(px[:1]), output_hidden_states=True).hidden_states[-2]
            self.encoder_forwards += 1
        return emb, neg

    def begin_round(self, ref_images: List, scale: float,
                    ref_prompts: Optional[List[str]] = None) -> dict:
        """Open a round over ``ref_images`` (empty: text only); returns round stats.
        (``ref_prompts`` is unused: IP-Adapter references are images only.)"""
        if self._round is not None:
            raise RuntimeError("a round is already open")
        before = self.encoder_images
        stack = contextlib.ExitStack()
        cfg = self.guidance > 1.0
        if ref_images and scale != 0:
            emb, neg = self.encode_images(ref_images)
            self._state = stack.enter_context(self.handle.references(
                emb, scale=scale, guidance=cfg, negative_image_embeds=neg))
        else:
            self._state = stack.enter_context(self.handle.text_only())
        self._round = stack
        return {"encoder_images": self.encoder_images - before, "cache_bytes": self.handle.nbytes,
                "num_refs": len(ref_images)}

    def end_round(self) -> None:
        if self._round is not None:
            self._round.close()
            self._round = None

    @property
    def cache_bytes(self) -> int:
        return self.handle.nbytes if self.handle is not None else 0

    # -- drawing ----------------------------------------------------------------------------
    @torch.no_grad()
    def draw(self, prompts: List[str], generators: List[torch.Generator],
             ref_index: Optional[List[List[int]]] = None,
             regions: Optional[List[List]] = None) -> List:
        """Draw one batch; ``ref_index[i]``: pool entries frame i reads (None = all).
        ``regions`` (a story's layout, one box or None per ``ref_index`` entry): each image
        token of a frame reads only the references whose box covers it, so a two-character
        frame does not give both looks to both characters (the IP-Adapter's tokens are global
        embeddings of a reference; the box decides which tokens of the frame read them)."""
        if self._round is None:
            raise RuntimeError("draw() outside a round")
        sel = (self.handle.select(ref_index, regions=regions, size=(self.height, self.width))
               if ref_index is not None and self._state.num_refs else contextlib.nullcontext())
        with sel:
            neg = None if self.negative_prompt is None else [self.negative_prompt] * len(prompts)
            out = self.pipe(prompt=prompts, negative_prompt=neg, generator=generators,
                            num_inference_steps=self.steps, guidance_scale=self.guidance,
                            height=self.height, width=self.width, output_type="pil")
        return out.images
