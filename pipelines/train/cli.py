"""LoRA training for Group-Shared Attention (GSA) on FLUX.1: stage ``gsa`` and ``dpo``.

    python -m pipelines.train --stage gsa [--model PATH] [--data DIR] [--output-dir DIR] ...
    python -m pipelines.train --stage dpo --stage1-lora DIR_OR_FILE [--data pairs.jsonl] ...

Stage gsa (supervised): each sample is one target plus ``--num-refs`` references
drawn from the target's story group.  The rows of a sample form one GSA group
(target first): the target is noised at ``sigma`` ~ logit-normal, the references
enter clean (``sigma = 0``), and with ``storyattn.GroupSharedAttention`` in
in-batch mode the target attends to its own text+image tokens plus the
references' image tokens while each reference attends only to itself.  The
flow-matching loss (velocity ``noise - x0``) is taken on the target only.  A
LoRA (rank = alpha = 16 by default) on the FLUX blocks' linear layers is trained.

Stage dpo: the stage-1 LoRA is loaded as adapter ``gsa`` and frozen; a second,
zero-initialised adapter ``dpo`` is trained.  Policy = gsa + dpo, reference
policy = gsa alone.  Winner and loser of a pair share noise, sigma and the
references (one GSA group ``[winner, loser, refs...]`` with two targets).
Loss ``-log sigmoid(-beta/2 ((e_w - e_w_ref) - (e_l - e_l_ref)))``.

Without ``--model``/``--data`` the stage runs on a tiny FLUX built offline and a
synthetic dataset it writes itself, and says so.

Outputs in ``--output-dir``: ``pytorch_lora_weights.safetensors`` (diffusers
format: ``FluxPipeline.load_lora_weights(OUT, adapter_name=...)``),
``metrics.jsonl`` (one line per step), ``checkpoints/checkpoint-N/`` (resume with
``--resume latest`` or ``--resume PATH``).  Every random draw of a step
(targets, references, caption dropout, noise, sigma) is a function of
``(seed, step, process index)``, so a resumed run reproduces the losses of an
uninterrupted one exactly.

Multi-process (DDP through accelerate)::

    accelerate launch --multi_gpu --num_processes N -m pipelines.train --stage gsa ...
    accelerate launch --multi_gpu --num_processes 2 -m pipelines.train --stage gsa --cpu ...
    torchrun --nproc_per_node 2 -m pipelines.train --stage gsa --cpu ...

On the CPU the processes talk over gloo (``accelerate launch --cpu`` alone starts
a single process).  ``--batch-size`` is per process; each process draws its own
samples (a function of the process index), and the logged values are averages
over processes.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .. import quiet
from ..cli_common import DefaultsFormatter, OneLineParser, UsageError
from ..lora_files import check_lora_file
from . import data as D
from . import losses as L
from . import model as M

STATE_FILE = "training_state.json"
TRAINABLE_FILE = "trainable_lora.safetensors"
CKPT_DIR = "checkpoints"

DEFAULTS = {
    # stage: (learning rate, max steps real, max steps synthetic)
    "gsa": (1e-4, 1000, 8),
    "dpo": (1e-5, 1000, 6),
}


class ConfigError(ValueError):
    """Bad command-line arguments; raised before training starts."""


def _say(accelerator, msg: str) -> None:
    if accelerator is None or accelerator.is_main_process:
        print(f"[train] {msg}", flush=True)


# ----------------------------------------------------------------------------------------
# arguments


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m pipelines.train", description=__doc__.split("\n\n")[0],
                      formatter_class=DefaultsFormatter)
    p.add_argument("--stage", choices=["gsa", "dpo"], required=True)
    p.add_argument("--model", default=None,
                   help="local FLUX.1 pipeline folder; default: a tiny FLUX built offline")
    p.add_argument("--data", default=None,
                   help="gsa: folder with metadata.jsonl; dpo: pairs.jsonl or its folder; "
                        "default: a synthetic dataset written to OUTPUT_DIR/synthetic_data")
    p.add_argument("--stage1-lora", default=None,
                   help="dpo: stage-1 LoRA (file or folder with pytorch_lora_weights.safetensors)")
    p.add_argument("--output-dir", default=None, help="default: outputs/train_<stage>")
    p.add_argument("--max-steps", type=int, default=None,
                   help="optimizer steps (default 1000; 8 gsa / 6 dpo on synthetic data)")
    p.add_argument("--batch-size", type=int, default=1, help="samples (targets/pairs) per process")
    p.add_argument("--num-refs", type=int, default=2, help="references per sample")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default = rank)")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="AdamW learning rate (default 1e-4 gsa, 1e-5 dpo)")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--lr-warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=1000.0, help="DPO beta")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="save a resumable checkpoint every N steps (default 500; 4 on synthetic "
                        "data; 0 = only at the end)")
    p.add_argument("--checkpoints-total-limit", type=int, default=3,
                   help="keep at most this many checkpoints (0 = keep all)")
    p.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=None,
                   help="square training size in pixels (default 512, or the VAE's sample_size "
                        "if smaller: 64 for the tiny model)")
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="T5 tokens (default 512, or the T5 tokenizer's limit if smaller)")
    p.add_argument("--caption-dropout", type=float, default=0.1,
                   help="gsa: probability of training a row with the empty caption")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="value fed to the guidance embedding (guidance-distilled models only)")
    p.add_argument("--timestep-scheme", choices=list(L.TIMESTEP_SCHEMES), default="logit_normal")
    p.add_argument("--logit-mean", type=float, default=0.0)
    p.add_argument("--logit-std", type=float, default=1.0)
    p.add_argument("--timestep-shift", type=float, default=1.0)
    p.add_argument("--mixed-precision", choices=["auto", "no", "bf16", "fp16"], default="auto",
                   help="auto = bf16 on GPU, none (fp32) on CPU")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--cache-latents", action="store_true",
                   help="encode every image with the VAE once, before training")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing",
                   action="store_false")
    p.add_argument("--log-every", type=int, default=1, help="tqdm postfix refresh interval")
    return p


def resolve_args(args) -> argparse.Namespace:
    """Fill stage/synthetic-dependent defaults and check ranges."""
    args.synthetic_model = args.model is None
    args.synthetic_data = args.data is None
    lr, steps_real, steps_syn = DEFAULTS[args.stage]
    if args.learning_rate is None:
        args.learning_rate = lr
    if args.max_steps is None:
        args.max_steps = steps_syn if args.synthetic_data else steps_real
    if args.checkpoint_every is None:
        args.checkpoint_every = 4 if args.synthetic_data else 500
    if args.output_dir is None:
        args.output_dir = f"outputs/train_{args.stage}"
    for name, lo in (("max_steps", 1), ("batch_size", 1), ("num_refs", 1), ("rank", 1),
                     ("checkpoint_every", 0), ("lr_warmup_steps", 0), ("log_every", 1)):
        if getattr(args, name) < lo:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(args, name)}")
    if not args.learning_rate > 0:
        raise ConfigError(f"--learning-rate must be > 0, got {args.learning_rate}")
    if not 0.0 <= args.caption_dropout < 1.0:
        raise ConfigError(f"--caption-dropout must be in [0, 1), got {args.caption_dropout}")
    if args.stage == "dpo" and not args.beta > 0:
        raise ConfigError(f"--beta must be > 0, got {args.beta}")
    if args.stage == "gsa" and args.stage1_lora is not None:
        raise ConfigError("--stage1-lora is for --stage dpo")
    if args.stage == "dpo" and args.stage1_lora is None and not args.synthetic_model:
        raise ConfigError("--stage dpo with --model needs --stage1-lora (the stage gsa output)")
    if args.model is not None:
        M.check_model_path(args.model)
    return args


# ----------------------------------------------------------------------------------------
# checkpoints


def list_checkpoints(output_dir: Path) -> List[Path]:
    root = output_dir / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("checkpoint-") and (d / STATE_FILE).is_file():
            try:
                found.append((int(d.name.split("-", 1)[1]), d))
            except ValueError:
                continue
    return [d for _, d in sorted(found)]


def resolve_resume(resume: Optional[str], output_dir: Path) -> Optional[Path]:
    if resume is None:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1] if ckpts else None
    p = Path(resume)
    if not (p / STATE_FILE).is_file():
        raise ConfigError(f"--resume {p}: not a checkpoint folder (no {STATE_FILE})")
    return p


# ----------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """One stage of training; ``run()`` does everything and returns a summary."""

    def __init__(self, args):
        self.args = args
        self.out = Path(args.output_dir)

    # -- setup -------------------------------------------------------------------------

    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        args = self.args
        use_cpu = args.cpu or not torch.cuda.is_available()
        mp = args.mixed_precision
        if mp == "auto":
            mp = "no" if use_cpu else "bf16"
        if use_cpu and mp != "no":
            raise ConfigError(f"--mixed-precision {mp} needs a GPU; on the CPU training runs in fp32")
        acc = Accelerator(mixed_precision=mp, cpu=use_cpu,
                          project_config=ProjectConfiguration(project_dir=str(self.out)))
        self.weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16,
                             "fp16": torch.float16}[mp]
        if use_cpu:
            _say(acc, "device: CPU -> fp32 weights, no mixed precision")
        else:
            _say(acc, f"device: {acc.device}, mixed precision {mp} (frozen weights {self.weight_dtype}, "
                      f"trainable LoRA weights fp32)")
        if acc.num_processes > 1:
            _say(acc, f"{acc.num_processes} processes ({acc.distributed_type})")
        return acc

    def _resolve_inputs(self, acc):
        args = self.args
        if args.synthetic_model:
            from ..tiny import get_tiny_flux

            with acc.main_process_first():
                args.model = get_tiny_flux()
            _say(acc, f"no --model given: using the tiny FLUX built offline with random weights "
                      f"({args.model})")
        else:
            M.check_model_path(args.model)
        res, seq = M.model_defaults(args.model)
        args.resolution = args.resolution or res
        step = 2 * M.vae_scale_factor(args.model)
        if args.resolution % step:   # checked here, before any weight loads
            raise ConfigError(f"--resolution {args.resolution}: must be a multiple of {step} "
                              f"(VAE factor {step // 2} x 2x2 packing); e.g. --resolution "
                              f"{max(step, args.resolution // step * step)}")
        args.max_sequence_length = args.max_sequence_length or seq
        if args.synthetic_data:
            from . import synthetic as S

            root = self.out / "synthetic_data"
            with acc.main_process_first():
                if args.stage == "gsa":
                    args.data = str(S.make_story_groups(root / "groups", size=args.resolution,
                                                        seed=args.seed))
                else:
                    args.data = str(S.make_dpo_pairs(root / "pairs", size=args.resolution,
                                                     seed=args.seed))
            _say(acc, f"no --data given: training on a synthetic {args.stage} dataset written to "
                      f"{args.data}")

    def _load_data(self, acc):
        args = self.args
        if args.stage == "gsa":
            self.ds = D.load_story_groups(args.data)
            _say(acc, f"data: {D.describe_groups(self.ds, args.num_refs)}")
            self.image_paths = list(self.ds.paths)
            self.prompts = list(self.ds.captions) + [""]
            n_items = len(self.ds)
        else:
            self.ds = D.load_preference_pairs(args.data)
            self.image_paths = self.ds.all_images()
            self.prompts = list(self.ds.prompts)
            n_items = len(self.ds)
            _say(acc, f"data: {n_items} preference pairs, {len(self.image_paths)} images")
        self.path_index = {p: i for i, p in enumerate(self.image_paths)}
        self.sampler = D.StepSampler(n_items, args.batch_size, acc.num_processes, args.seed)

    def _load_model(self, acc):
        args = self.args
        if args.stage1_lora is not None:   # a wrong file is refused before any weight loads
            check_lora_file(str(M._lora_file(args.stage1_lora)), "flux", "--stage1-lora")
        with quiet.no_loading_bars():
            pipe = M.load_pipeline(args.model, self.weight_dtype)
        vsf = pipe.vae_scale_factor
        if args.resolution % (2 * vsf):
            raise ConfigError(f"--resolution {args.resolution} must be a multiple of {2 * vsf} "
                              f"(VAE factor {vsf} x 2x2 packing)")
        self.latent_hw = args.resolution // vsf
        tr = pipe.transformer
        if args.stage == "dpo":
            if args.stage1_lora is None:
                args.stage1_lora = self._synthetic_stage1(acc)
            with quiet.multiple_adapters_expected():
                n = M.load_frozen_lora(pipe, args.stage1_lora, M.STAGE1_ADAPTER)
            _say(acc, f"stage-1 LoRA {args.stage1_lora}: {n} layers loaded as adapter "
                      f"'{M.STAGE1_ADAPTER}', frozen")
        device = acc.device
        pipe.text_encoder.to(device)
        pipe.text_encoder_2.to(device)
        self.text = M.encode_prompts(pipe, self.prompts, device, args.max_sequence_length)
        pipe.text_encoder = pipe.text_encoder_2 = None   # cached: free the encoders
        self.vae = pipe.vae.to(device)
        self.latent_cache: Dict[int, torch.Tensor] = {}
        if args.cache_latents:
            for i in range(0, len(self.image_paths), 8):
                idx = list(range(i, min(i + 8, len(self.image_paths))))
                lat = self._encode(idx)
                for j, k in enumerate(idx):
                    self.latent_cache[k] = lat[j].cpu()
            self.vae = None
            _say(acc, f"latent cache: {len(self.latent_cache)} images encoded once")
        pipe.vae = None
        self.pipe = pipe
        self.transformer = tr
        self.guidance = args.guidance_scale if M.has_guidance_embeds(tr) else None

    def _synthetic_stage1(self, acc) -> str:
        """dpo on the tiny model without --stage1-lora: train a short stage gsa first."""
        sub = self.out / "stage1"
        _say(acc, f"no --stage1-lora given: training a short stage gsa on synthetic data into {sub}")
        argv = ["--stage", "gsa", "--output-dir", str(sub), "--model", self.args.model,
                "--seed", str(self.args.seed), "--num-refs", str(self.args.num_refs),
                "--rank", str(self.args.rank), "--max-steps", "4", "--checkpoint-every", "0"]
        if self.args.cpu:
            argv.append("--cpu")
        argv += ["--mixed-precision", self.args.mixed_precision]
        gargs = resolve_args(build_parser().parse_args(argv))
        Trainer(gargs).run()
        return str(sub)

    def _setup_lora(self, acc):
        args, tr = self.args, self.transformer
        from accelerate.utils import set_seed

        set_seed(args.seed)          # LoRA A init (and any other global draw) is seeded
        self.adapter = M.STAGE1_ADAPTER if args.stage == "gsa" else M.DPO_ADAPTER
        with quiet.multiple_adapters_expected():   # dpo: stage 1 + dpo, on purpose
            M.add_trainable_lora(tr, self.adapter, args.rank, args.alpha)
        if args.stage == "dpo":
            M.activate_adapters(tr, [M.STAGE1_ADAPTER, M.DPO_ADAPTER], trainable=M.DPO_ADAPTER)
            self.frozen_names = list(M.adapter_params(tr, M.STAGE1_ADAPTER))
            nonzero = [n for n, p in M.adapter_params(tr, M.DPO_ADAPTER).items()
                       if "lora_B" in n and bool(p.detach().any())]
            if nonzero:   # policy must equal the reference policy at step 0
                raise RuntimeError(f"the DPO adapter does not start at zero: {nonzero[:3]}")
        else:
            M.activate_adapters(tr, [self.adapter], trainable=self.adapter)
            self.frozen_names = []
        if args.gradient_checkpointing:
            tr.enable_gradient_checkpointing()
        tr.to(acc.device)
        tr.train()
        from storyattn import GroupSharedAttention

        self.gsa = GroupSharedAttention(tr)
        params = M.trainable_parameters(tr)
        _say(acc, f"LoRA '{self.adapter}': rank {args.rank}, alpha {args.alpha or args.rank}, "
                  f"{len(M.lora_module_names(tr, self.adapter))} layers, "
                  f"{M.count(params):,} trainable parameters")
        self.optimizer = torch.optim.AdamW(params, lr=args.learning_rate,
                                           weight_decay=args.weight_decay)
        warm = args.lr_warmup_steps
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
        self.model, self.optimizer = acc.prepare(tr, self.optimizer)
        acc.register_for_checkpointing(self.lr_scheduler)
        self._hooks = [acc.register_save_state_pre_hook(self._save_hook),
                       acc.register_load_state_pre_hook(self._load_hook)]

    # accelerate hooks: checkpoints hold only the trainable LoRA, never the base model
    def _save_hook(self, models, weights, output_dir):
        from safetensors.torch import save_file

        if self.acc.is_main_process:
            tr = self.acc.unwrap_model(self.model)
            sd = {n: p.detach().cpu().contiguous() for n, p in M.adapter_params(tr, self.adapter).items()}
            save_file(sd, str(Path(output_dir) / TRAINABLE_FILE))
        while weights:
            weights.pop()

    def _load_hook(self, models, input_dir):
        from safetensors.torch import load_file

        while models:
            models.pop()
        sd = load_file(str(Path(input_dir) / TRAINABLE_FILE))
        params = M.adapter_params(self.acc.unwrap_model(self.model), self.adapter)
        if set(sd) != set(params):
            raise ConfigError(f"checkpoint {input_dir} was written for other LoRA layers "
                              f"(different --rank/--stage/model?)")
        with torch.no_grad():
            for n, p in params.items():
                if sd[n].shape != p.shape:
                    raise ConfigError(f"checkpoint {input_dir}: {n} has shape {tuple(sd[n].shape)}, "
                                      f"the model needs {tuple(p.shape)} (different --rank?)")
                p.copy_(sd[n].to(p.dtype))

    # -- data per step -------------------------------------------------------------------

    def _encode(self, image_indices: List[int]) -> torch.Tensor:
        pix = torch.stack([D.load_image(self.image_paths[i], self.args.resolution)
                           for i in image_indices])
        return M.encode_latents(self.vae, pix)

    def _latents(self, image_indices: List[int]) -> torch.Tensor:
        """Packed latents ``[rows, L, 64]`` on the device, float32."""
        if self.latent_cache:
            lat = torch.stack([self.latent_cache[i] for i in image_indices]).to(self.acc.device)
        else:
            uniq = list(dict.fromkeys(image_indices))
            enc = self._encode(uniq)
            pos = {k: j for j, k in enumerate(uniq)}
            lat = enc[[pos[i] for i in image_indices]]
        return M.pack_latents(lat.float())

    def _text(self, prompts: List[str]):
        emb = torch.stack([self.text[p][0] for p in prompts]).to(self.acc.device, self.weight_dtype)
        pooled = torch.stack([self.text[p][1] for p in prompts]).to(self.acc.device, self.weight_dtype)
        return emb, pooled

    def _noise(self, step: int, n: int, shape):
        """Target noise levels and noise for this (seed, step, process), CPU-drawn."""
        a = self.args
        g = D.step_torch_generator(a.seed, step, self.acc.process_index, 2)
        sigma = L.sample_sigmas(n, g, a.timestep_scheme, a.logit_mean, a.logit_std, a.timestep_shift)
        noise = torch.randn((n, *shape), generator=g, dtype=torch.float32)
        return sigma.to(self.acc.device), noise.to(self.acc.device)

    def _gsa_batch(self, step: int):
        a, ds = self.args, self.ds
        rank = self.acc.process_index
        rng = D.step_rng(a.seed, step, rank, 1)
        rows: List[int] = []
        for t in self.sampler.indices(step, rank):
            others = [j for j in ds.groups[ds.group_of[t]] if j != t]
            rows += [t] + D.choose(rng, others, a.num_refs)
        drop = rng.random(len(rows)) < a.caption_dropout
        prompts = ["" if d else ds.captions[i] for i, d in zip(rows, drop)]
        return rows, prompts

    def _dpo_batch(self, step: int):
        a, ds = self.args, self.ds
        rank = self.acc.process_index
        rng = D.step_rng(a.seed, step, rank, 1)
        rows: List[int] = []
        prompts: List[str] = []
        for k in self.sampler.indices(step, rank):
            refs = D.choose(rng, range(len(ds.references[k])), a.num_refs)
            paths = [ds.winners[k], ds.losers[k]] + [ds.references[k][j] for j in refs]
            rows += [self.path_index[p] for p in paths]
            prompts += [ds.prompts[k]] * len(paths)
        return rows, prompts

    # -- steps ----------------------------------------------------------------------------

    def _forward(self, model, packed, text, pooled, sigma):
        with self.acc.autocast():
            return M.flux_forward(model, packed, text, pooled, sigma, self.img_ids, self.guidance)

    def _gsa_step(self, step: int):
        a = self.args
        G = a.num_refs + 1
        rows, prompts = self._gsa_batch(step)
        x0 = self._latents(rows)                       # [B*G, L, 64]
        tgt = torch.arange(0, x0.shape[0], G, device=x0.device)
        sigma_t, noise = self._noise(step, len(tgt), x0.shape[1:])
        packed = x0.clone()
        packed[tgt] = L.add_noise(x0[tgt], noise, sigma_t)
        sigma = torch.zeros(x0.shape[0], device=x0.device)
        sigma[tgt] = sigma_t
        text, pooled = self._text(prompts)
        # backward stays inside the GSA context: gradient checkpointing re-runs the
        # blocks during backward, and they must share the references again.
        with self.gsa.in_batch(group_size=G, num_targets=1):
            pred = self._forward(self.model, packed.to(self.weight_dtype), text, pooled, sigma)
            err = L.flow_matching_errors(pred[tgt], x0[tgt], noise)
            loss = err.mean()
            self.acc.backward(loss)
        return loss.detach(), {"sigma": float(sigma_t.mean())}

    def _dpo_step(self, step: int):
        a = self.args
        G = a.num_refs + 2
        rows, prompts = self._dpo_batch(step)
        x0 = self._latents(rows)                       # [B*G, L, 64]
        n_pairs = x0.shape[0] // G
        w_idx = torch.arange(0, x0.shape[0], G, device=x0.device)
        l_idx = w_idx + 1
        sigma_p, noise = self._noise(step, n_pairs, x0.shape[1:])
        packed = x0.clone()
        packed[w_idx] = L.add_noise(x0[w_idx], noise, sigma_p)     # shared noise and sigma
        packed[l_idx] = L.add_noise(x0[l_idx], noise, sigma_p)
        sigma = torch.zeros(x0.shape[0], device=x0.device)
        sigma[w_idx] = sigma_p
        sigma[l_idx] = sigma_p
        text, pooled = self._text(prompts)
        packed = packed.to(self.weight_dtype)
        tr = self.acc.unwrap_model(self.model)
        with self.gsa.in_batch(group_size=G, num_targets=2):
            with torch.no_grad():
                M.activate_adapters(tr, [M.STAGE1_ADAPTER], trainable=M.DPO_ADAPTER)
                try:
                    ref = self._forward(tr, packed, text, pooled, sigma)
                finally:
                    M.activate_adapters(tr, [M.STAGE1_ADAPTER, M.DPO_ADAPTER],
                                        trainable=M.DPO_ADAPTER)
                e_w_ref = L.flow_matching_errors(ref[w_idx], x0[w_idx], noise, torch.float64)
                e_l_ref = L.flow_matching_errors(ref[l_idx], x0[l_idx], noise, torch.float64)
            pred = self._forward(self.model, packed, text, pooled, sigma)
            e_w = L.flow_matching_errors(pred[w_idx], x0[w_idx], noise, torch.float64)
            e_l = L.flow_matching_errors(pred[l_idx], x0[l_idx], noise, torch.float64)
            loss, stats = L.dpo_loss(e_w, e_l, e_w_ref, e_l_ref, a.beta)
            self.acc.backward(loss)
        stats["sigma"] = float(sigma_p.mean())
        return loss.detach(), stats

    def _check_frozen(self):
        if not self.frozen_names:
            return
        params = dict(self.acc.unwrap_model(self.model).named_parameters())
        bad = [n for n in self.frozen_names if params[n].requires_grad or params[n].grad is not None]
        if bad:
            raise RuntimeError(f"stage-1 LoRA parameters are not frozen: {bad[:3]}")

    # -- main loop ---------------------------------------------------------------------------

    def _reduce(self, values: Dict[str, float]) -> Dict[str, float]:
        if self.acc.num_processes == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.acc.device)
        t = self.acc.reduce(t, reduction="mean")
        return {k: float(v) for k, v in zip(keys, t.tolist())}

    def _processes_in_sync(self) -> bool:
        """Every process must end with bit-identical trainable weights (DDP averages the
        gradients); a checksum per process is compared."""
        acc = self.acc
        if acc.num_processes == 1:
            return True
        params = M.adapter_params(acc.unwrap_model(self.model), self.adapter).values()
        chk = torch.stack([p.detach().double().sum() for p in params]).sum().view(1)
        every = acc.gather(chk.to(acc.device)).cpu()
        if not bool((every == every[0]).all()):
            raise RuntimeError(f"trainable weights differ between processes: checksums "
                               f"{every.tolist()}")
        return True

    def _save_checkpoint(self, step: int):
        acc = self.acc
        d = self.out / CKPT_DIR / f"checkpoint-{step}"
        acc.save_state(str(d))
        if acc.is_main_process:
            state = {"step": step, "stage": self.args.stage, "seed": self.args.seed,
                     "num_processes": acc.num_processes, "batch_size": self.args.batch_size,
                     "num_refs": self.args.num_refs, "rank": self.args.rank,
                     "sampler_next_slot": (step * acc.num_processes) * self.args.batch_size}
            (d / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
            limit = self.args.checkpoints_total_limit
            ckpts = list_checkpoints(self.out)
            if limit > 0 and len(ckpts) > limit:
                for old in ckpts[:-limit]:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def _resume(self) -> int:
        acc, args = self.acc, self.args
        ckpt = resolve_resume(args.resume, self.out)
        if ckpt is None:
            if args.resume == "latest":
                _say(acc, f"--resume latest: no checkpoint in {self.out / CKPT_DIR}; starting at step 0")
            return 0
        state = json.loads((ckpt / STATE_FILE).read_text())
        if state.get("stage") != args.stage:
            raise ConfigError(f"checkpoint {ckpt} is from stage {state.get('stage')}, not {args.stage}")
        for key, cur in (("seed", args.seed), ("num_processes", acc.num_processes),
                         ("batch_size", args.batch_size), ("num_refs", args.num_refs)):
            if state.get(key) != cur:
                _say(acc, f"warning: checkpoint {key}={state.get(key)} but this run has {cur}: the "
                          f"continuation will not match an uninterrupted run")
        acc.load_state(str(ckpt))
        _say(acc, f"resumed from {ckpt} at step {state['step']}")
        return int(state["step"])

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        acc = self._accelerator()
        return self._run_with(acc)

    def _run_with(self, acc) -> dict:
        from tqdm.auto import tqdm

        self.acc = acc
        args = self.args
        self.out.mkdir(parents=True, exist_ok=True)
        if args.resume is not None and args.resume != "latest":
            resolve_resume(args.resume, self.out)        # fail before loading anything
        self._resolve_inputs(acc)
        self._load_data(acc)
        self._load_model(acc)
        self.img_ids = M.image_ids(self.latent_hw, self.latent_hw, acc.device, self.weight_dtype)
        self._setup_lora(acc)
        start = self._resume()
        if start >= args.max_steps:
            _say(acc, f"checkpoint step {start} >= --max-steps {args.max_steps}: nothing to train")

        metrics_path = self.out / "metrics.jsonl"
        if acc.is_main_process:
            kept = []
            if start > 0 and metrics_path.is_file():
                for line in metrics_path.read_text().splitlines():
                    if line.strip() and json.loads(line)["step"] <= start:
                        kept.append(line)
            metrics_path.write_text("".join(k + "\n" for k in kept))
        _say(acc, f"stage {args.stage}: steps {start + 1}..{args.max_steps}, batch {args.batch_size} "
                  f"x {acc.num_processes} process(es), {args.num_refs} reference(s) per sample, "
                  f"lr {args.learning_rate:g}")

        step_fn = self._gsa_step if args.stage == "gsa" else self._dpo_step
        # a bar on a terminal; in a log (stderr not a terminal) one plain line per log_every
        tty = sys.stderr.isatty()
        bar = tqdm(total=args.max_steps, initial=start,
                   disable=not acc.is_main_process or not tty,
                   desc=f"train {args.stage}", dynamic_ncols=True)
        last = {}
        t_start = time.perf_counter()
        for step in range(start, args.max_steps):
            t0 = time.perf_counter()
            loss, stats = step_fn(step)
            self._check_frozen()
            grad_norm = None
            if args.max_grad_norm > 0:
                grad_norm = acc.clip_grad_norm_(M.trainable_parameters(self.model), args.max_grad_norm)
            lr = self.lr_scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            vals = {"loss": float(loss), **stats}
            if grad_norm is not None:
                vals["grad_norm"] = float(grad_norm)
            vals = self._reduce(vals)
            if not math.isfinite(vals["loss"]):
                raise RuntimeError(f"loss became {vals['loss']} at step {step + 1}")
            rec = {"step": step + 1, **vals, "lr": lr, "epoch": round(self.sampler.epoch(step), 4),
                   "step_time_s": round(time.perf_counter() - t0, 4)}
            last = rec
            if acc.is_main_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
                post = {"loss": f"{vals['loss']:.4f}", "lr": f"{lr:.2e}"}
                if "implicit_acc" in vals:
                    post["acc"] = f"{vals['implicit_acc']:.2f}"
                bar.set_postfix(post)
                if not tty:
                    _say(acc, f"step {step + 1}/{args.max_steps} "
                              + " ".join(f"{k} {v}" for k, v in post.items()))
            bar.update(1)
            if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
                self._save_checkpoint(step + 1)
        bar.close()
        if start < args.max_steps and (not args.checkpoint_every
                                       or args.max_steps % args.checkpoint_every):
            self._save_checkpoint(args.max_steps)

        acc.wait_for_everyone()
        in_sync = self._processes_in_sync()
        lora_path = None
        if acc.is_main_process:
            tr = acc.unwrap_model(self.model)
            lora_path = M.save_lora(tr, self.adapter, self.out)
            summary = {"stage": args.stage, "adapter": self.adapter, "lora": str(lora_path),
                       "model": str(args.model), "data": str(args.data),
                       "synthetic_model": args.synthetic_model, "synthetic_data": args.synthetic_data,
                       "steps": args.max_steps, "resumed_from": start, "last": last,
                       "num_processes": acc.num_processes, "processes_in_sync": in_sync,
                       "train_time_s": round(time.perf_counter() - t_start, 2),
                       "stage1_lora": str(args.stage1_lora) if args.stage1_lora else None}
            (self.out / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            _say(acc, f"saved LoRA '{self.adapter}' to {lora_path}")
            _say(acc, f"load it with FluxPipeline.load_lora_weights({str(self.out)!r}, "
                      f"adapter_name={self.adapter!r})")
        acc.wait_for_everyone()
        self.gsa.remove()
        for h in self._hooks:
            h.remove()
        acc.free_memory()
        return {"lora": str(lora_path) if lora_path else None, "last": last, "start": start}


def main(argv=None) -> int:
    quiet.install()  # before diffusers/transformers import: some notices fire at import
    args = build_parser().parse_args(argv)
    out, existed = None, True
    try:
        args = resolve_args(args)
        out = Path(args.output_dir)
        existed = out.exists()
        Trainer(args).run()
    except (ConfigError, D.DataError, M.ModelError, UsageError) as exc:
        print(f"[train] error: {exc}", file=sys.stderr, flush=True)
        _abandon(out, existed)
        return 2
    except BaseException:
        _abandon(out, existed)
        raise
    return 0


def _abandon(out: Optional[Path], existed: bool) -> None:
    """A start that failed before its first checkpoint leaves no half-made folder."""
    if out is not None and not existed and out.is_dir() \
            and not any((out / CKPT_DIR).glob("checkpoint-*")):
        shutil.rmtree(out, ignore_errors=True)

