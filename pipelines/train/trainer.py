"""The trainer of ``python -m pipelines.train``: one stage's setup (accelerator, inputs,
data, FLUX, LoRA adapters, optimizer) and its loop (steps, metrics, checkpoints, the
saved LoRA and ``train_summary.json``)."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Dict

import torch

from .. import quiet
from ..lora_files import check_lora_file, lora_file
from . import checkpoints as C
from . import data as D
from . import model as M
from .args import TINY_FLUX2, ConfigError, build_parser, resolve_args
from .log import say
from .steps import StepMixin


class Trainer(StepMixin):
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
            say(acc, "device: CPU -> fp32 weights, no mixed precision")
        else:
            say(acc, f"device: {acc.device}, mixed precision {mp} (frozen weights {self.weight_dtype}, "
                     f"trainable LoRA weights fp32)")
        if acc.num_processes > 1:
            say(acc, f"{acc.num_processes} processes ({acc.distributed_type})")
        return acc

    def _resolve_inputs(self, acc):
        args = self.args
        if args.synthetic_model:
            from ..tiny import TINY_FLUX2_MAX_SEQUENCE_LENGTH, get_tiny_flux, get_tiny_flux2

            name = args.model
            with acc.main_process_first():
                args.model = get_tiny_flux2() if name == TINY_FLUX2 else get_tiny_flux()
            if name == TINY_FLUX2 and args.max_sequence_length is None:
                # the tiny tokenizer allows 512; the tiny preset is meant to run at 32
                args.max_sequence_length = TINY_FLUX2_MAX_SEQUENCE_LENGTH
            what = "FLUX.2 [klein]" if name == TINY_FLUX2 else "FLUX"
            say(acc, f"--model {name}: the tiny {what} built offline with random weights "
                     f"({args.model})")
        else:
            M.check_model_path(args.model)
            if args.world_model:
                say(acc, f"no --model given: the committed story-world FLUX ({args.model}), "
                         f"world recipe defaults")
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
            why = "no --data given" if args.data is None else "--data synthetic"
            with acc.main_process_first():
                if args.stage == "gsa":
                    args.data = str(S.make_story_groups(root / "groups", size=args.resolution,
                                                        seed=args.seed))
                else:
                    args.data = str(S.make_dpo_pairs(root / "pairs", size=args.resolution,
                                                     seed=args.seed))
            say(acc, f"{why}: a synthetic "
                     f"{args.stage} dataset written to {args.data}")
        elif args.world_data and args.stage == "gsa":
            from ..world.recipe import WORLD_GROUPS, WORLD_PER_GROUP, world_gsa_data

            with acc.main_process_first():
                args.data = str(world_gsa_data(self.out / "world_data", seed=args.seed))
            say(acc, f"no --data given: world story groups ({WORLD_GROUPS} training identities x "
                     f"{WORLD_PER_GROUP} frames, seed {args.seed}) in {args.data}")
        elif args.world_data:
            say(acc, f"no --data given: the committed world preference pools ({args.data})")
        if getattr(args, "world_stage1", False):
            say(acc, f"no --stage1-lora given: the committed world stage-1 LoRA "
                     f"({args.stage1_lora})")

    def _load_data(self, acc):
        args = self.args
        if args.stage == "gsa":
            self.ds = D.load_story_groups(args.data)
            say(acc, f"data: {D.describe_groups(self.ds, args.num_refs)}")
            self.image_paths = list(self.ds.paths)
            self.prompts = list(self.ds.captions) + [""]
            n_items = len(self.ds)
        else:
            self.ds = D.load_preference_pairs(args.data)
            self.image_paths = self.ds.all_images()
            self.prompts = list(self.ds.prompts)
            n_items = len(self.ds)
            say(acc, f"data: {n_items} preference pairs, {len(self.image_paths)} images")
        self.path_index = {p: i for i, p in enumerate(self.image_paths)}
        self.sampler = D.StepSampler(n_items, args.batch_size, acc.num_processes, args.seed)

    def _load_model(self, acc):
        args = self.args
        if args.stage1_lora is not None:   # a wrong file is refused before any weight loads
            check_lora_file(str(lora_file(args.stage1_lora)), M.model_family(args.model),
                            "--stage1-lora")
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
            say(acc, f"stage-1 LoRA {args.stage1_lora}: {n} layers loaded as adapter "
                     f"'{M.STAGE1_ADAPTER}', frozen")
        device = acc.device
        self.family = M.family_of(tr)
        self.io = M.inputs(self.family)
        for name in ("text_encoder", "text_encoder_2"):   # FLUX.2 has one text encoder
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(device)
        self.text = self.io.encode_prompts(pipe, self.prompts, device, args.max_sequence_length)
        for name in ("text_encoder", "text_encoder_2"):   # cached: free the encoders
            if hasattr(pipe, name):
                setattr(pipe, name, None)
        self.vae = pipe.vae.to(device)
        self.latent_cache: Dict[int, torch.Tensor] = {}
        if args.cache_latents:
            for i in range(0, len(self.image_paths), 8):
                idx = list(range(i, min(i + 8, len(self.image_paths))))
                lat = self._encode(idx)
                for j, k in enumerate(idx):
                    self.latent_cache[k] = lat[j].cpu()
            self.vae = None
            say(acc, f"latent cache: {len(self.latent_cache)} images encoded once")
        pipe.vae = None
        self.pipe = pipe
        self.transformer = tr
        self.guidance = args.guidance_scale if self.io.has_guidance_embeds(tr) else None

    def _synthetic_stage1(self, acc) -> str:
        """dpo on the tiny model without --stage1-lora: train a short stage gsa first."""
        sub = self.out / "stage1"
        say(acc, f"no --stage1-lora given: training a short stage gsa on synthetic data into {sub}")
        argv = ["--stage", "gsa", "--output-dir", str(sub), "--model", self.args.model,
                "--data", "synthetic", "--seed", str(self.args.seed), "--num-refs", str(self.args.num_refs),
                "--rank", str(self.args.rank), "--max-steps", "4", "--checkpoint-every", "0"]
        if self.args.max_sequence_length:   # stage 1 reads the text as this stage does
            argv += ["--max-sequence-length", str(self.args.max_sequence_length)]
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
        say(acc, f"LoRA '{self.adapter}': rank {args.rank}, alpha {args.alpha or args.rank}, "
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
        C.save_trainable(self.acc, self.model, self.adapter, weights, output_dir)

    def _load_hook(self, models, input_dir):
        C.load_trainable(self.acc, self.model, self.adapter, models, input_dir)

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
        C.save_checkpoint(self.acc, self.out, step, self.args)

    def _resume(self) -> int:
        return C.resume(self.acc, self.args, self.out)

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
            C.resolve_resume(args.resume, self.out)        # fail before loading anything
        self._resolve_inputs(acc)
        self._load_data(acc)
        self._load_model(acc)
        self.img_ids = self.io.image_ids(self.latent_hw, self.latent_hw, acc.device,
                                         self.weight_dtype)
        self._setup_lora(acc)
        start = self._resume()
        if start >= args.max_steps:
            say(acc, f"checkpoint step {start} >= --max-steps {args.max_steps}: nothing to train")

        metrics_path = self.out / "metrics.jsonl"
        if acc.is_main_process:
            kept = []
            if start > 0 and metrics_path.is_file():
                for line in metrics_path.read_text().splitlines():
                    if line.strip() and json.loads(line)["step"] <= start:
                        kept.append(line)
            metrics_path.write_text("".join(k + "\n" for k in kept))
        say(acc, f"stage {args.stage}: steps {start + 1}..{args.max_steps}, batch {args.batch_size} "
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
            if step == start + 1 and step + 1 < args.max_steps:   # the first step warms up
                left = (args.max_steps - step - 1) * rec["step_time_s"]
                say(acc, f"step time {rec['step_time_s']:.2f} s: the remaining "
                         f"{args.max_steps - step - 1} steps take about {_duration(left)}")
            if acc.is_main_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
                post = {"loss": f"{vals['loss']:.4f}", "lr": f"{lr:.2e}"}
                if "implicit_acc" in vals:
                    post["acc"] = f"{vals['implicit_acc']:.2f}"
                bar.set_postfix(post)
                if not tty:
                    say(acc, f"step {step + 1}/{args.max_steps} "
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
                       "world_model": args.world_model, "world_data": args.world_data,
                       "steps": args.max_steps, "resumed_from": start, "last": last,
                       "num_processes": acc.num_processes, "processes_in_sync": in_sync,
                       "train_time_s": round(time.perf_counter() - t_start, 2),
                       "stage1_lora": str(args.stage1_lora) if args.stage1_lora else None}
            (self.out / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            say(acc, f"saved LoRA '{self.adapter}' to {lora_path}")
            say(acc, f"load it with {M.pipeline_class(self.family).__name__}.load_lora_weights("
                     f"{str(self.out)!r}, "
                     f"adapter_name={self.adapter!r})")
        acc.wait_for_everyone()
        self.gsa.remove()
        for h in self._hooks:
            h.remove()
        acc.free_memory()
        return {"lora": str(lora_path) if lora_path else None, "last": last, "start": start}


def _duration(seconds: float) -> str:
    m, sec = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {sec:02d} s" if m else f"{sec} s"
