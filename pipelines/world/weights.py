"""Where the committed world weights live and how to load them.

``pipelines/world/weights/`` (package data), written by ``python -m pipelines.world_build build``::

    flux/                    FluxPipeline folder: world-trained transformer and VAE, tiny text
                             encoders (FluxPipeline.from_pretrained(flux_path()))
    sdxl/                    StableDiffusionXLPipeline folder: world-trained UNet, the world VAE,
                             tiny CLIP text encoders; sdxl/ip_adapter/ holds the world-trained
                             IP-Adapter and its image encoder (pipe.load_ip_adapter(
                             **ip_adapter_kwargs(sdxl_path())))
    lora_gsa.safetensors     stage 1 (GSA in-batch) LoRA, diffusers format
    lora_dpo.safetensors     stage 2 (DPO) LoRA, applied on top of stage 1
    dpo_data/                the preference pools stage 2 was trained from (``pairs.jsonl`` and
                             its images: candidates of stage 1, labelled through the studio)
    build.json               seed, settings and every stage's figures
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

__all__ = ["WEIGHTS_DIR", "FLUX_DIR", "GSA_LORA", "DPO_LORA", "BUILD_FILE", "flux_path",
           "gsa_lora_path", "SDXL_DIR", "sdxl_path", "dpo_lora_path", "DPO_DATA", "dpo_data_path",
           "available", "build_info", "IP_SUBFOLDER", "IP_WEIGHT_NAME", "IMAGE_ENCODER_FOLDER",
           "ip_adapter_kwargs"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FLUX_DIR = "flux"
SDXL_DIR = "sdxl"
GSA_LORA = "lora_gsa.safetensors"
DPO_LORA = "lora_dpo.safetensors"
BUILD_FILE = "build.json"
DPO_DATA = "dpo_data"


def available(root=None) -> bool:
    root = Path(root or WEIGHTS_DIR)
    return (root / FLUX_DIR / "model_index.json").is_file() and (root / GSA_LORA).is_file()


def _need(root) -> Path:
    root = Path(root or WEIGHTS_DIR)
    if not available(root):
        raise FileNotFoundError(f"no world weights in {root}: build them with "
                                f"`python -m pipelines.world_build build`")
    return root


def flux_path(root=None) -> str:
    return str(_need(root) / FLUX_DIR)


def sdxl_path(root=None) -> str:
    """The world SDXL pipeline folder (with its IP-Adapter under ``ip_adapter/``)."""
    root = Path(root or WEIGHTS_DIR)
    if not (root / SDXL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"no world SDXL weights in {root}: build them with "
                                f"`python -m pipelines.world_build build --only sdxl_base sdxl_ip "
                                f"sdxl_export`")
    return str(root / SDXL_DIR)


def gsa_lora_path(root=None) -> str:
    return str(_need(root) / GSA_LORA)


def dpo_lora_path(root=None) -> str:
    return str(_need(root) / DPO_LORA)


def dpo_data_path(root=None) -> str:
    """The committed stage-2 training pools (a folder with ``pairs.jsonl``)."""
    root = _need(root)
    if not (root / DPO_DATA / "pairs.jsonl").is_file():
        raise FileNotFoundError(f"no preference pools in {root / DPO_DATA}: make them with "
                                f"`python -m pipelines.world_build build --only dpo_data dpo export`")
    return str(root / DPO_DATA)


def build_info(root=None) -> Dict[str, Any]:
    return json.loads((_need(root) / BUILD_FILE).read_text())


# the world SDXL's IP-Adapter, inside its pipeline folder (written by the build's sdxl_ip stage)
IP_SUBFOLDER = "ip_adapter"
IP_WEIGHT_NAME = "ip-adapter_world.safetensors"
IMAGE_ENCODER_FOLDER = "image_encoder"


def ip_adapter_kwargs(path) -> dict:
    """Arguments of ``pipe.load_ip_adapter(**ip_adapter_kwargs(sdxl_folder))``."""
    return {"pretrained_model_name_or_path_or_dict": str(path), "subfolder": IP_SUBFOLDER,
            "weight_name": IP_WEIGHT_NAME, "image_encoder_folder": IMAGE_ENCODER_FOLDER}
