"""One optimizer step's forward and backward of ``python -m pipelines.train``: the rows
of a step (targets or pairs with their references), their latents, text, noise and sigma,
and the stage gsa (flow matching) and stage dpo losses.

Every draw is a function of ``(seed, step, process index)``, so a resumed run repeats
the steps of an uninterrupted one exactly."""
from __future__ import annotations

from typing import List, Optional

import torch

from storyattn import region_masks

from .. import flow_matching as L
from . import data as D
from . import model as M


# a padding slot of a target that names fewer references than --num-refs: read by nobody
ABSENT = "absent"


class StepMixin:
    """The per-step half of :class:`pipelines.train.trainer.Trainer`; it uses what the
    trainer's setup made (``args``, ``acc``, ``ds``, ``sampler``, ``image_paths``,
    ``path_index``, ``vae``, ``latent_cache``, ``text``, ``model``, ``gsa``, and ``io``: the
    model family's input module, :mod:`pipelines.flux_inputs` or :mod:`pipelines.flux2_inputs`)."""

    def _encode(self, image_indices: List[int]) -> torch.Tensor:
        pix = torch.stack([D.load_image(self.image_paths[i], self.args.resolution)
                           for i in image_indices])
        return self.io.encode_latents(self.vae, pix)

    def _latents(self, image_indices: List[int]) -> torch.Tensor:
        """Packed latents ``[rows, L, C]`` on the device, float32 (FLUX.1: C = 64)."""
        if self.latent_cache:
            lat = torch.stack([self.latent_cache[i] for i in image_indices]).to(self.acc.device)
        else:
            uniq = list(dict.fromkeys(image_indices))
            enc = self._encode(uniq)
            pos = {k: j for j, k in enumerate(uniq)}
            lat = enc[[pos[i] for i in image_indices]]
        return self.io.pack_latents(lat.float())

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
        layouts: List[Optional[list]] = []    # per target: a box/None per slot, "absent" pads
        for t in self.sampler.indices(step, rank):
            named = ds.refs_of[t] if ds.refs_of else None
            boxes = ds.regions_of[t] if ds.regions_of else None
            if boxes is not None:
                pick, lay = self._layout_pick(rng, boxes)
                layouts.append(lay)
                rows += [t] + [named[j] for j in pick]
                continue
            others = named or [j for j in ds.groups[ds.group_of[t]] if j != t]
            rows += [t] + D.choose(rng, others, a.num_refs)
            layouts.append(None)
        drop = rng.random(len(rows)) < a.caption_dropout
        prompts = ["" if d else ds.captions[i] for i, d in zip(rows, drop)]
        return rows, prompts, (layouts if any(l is not None for l in layouts) else None)

    def _layout_pick(self, rng, boxes: list):
        """Which of a line's references fill the ``--num-refs`` slots, and each slot's box.
        A layout binds each reference to its box, so they keep their pairs; a line naming
        fewer than --num-refs reads just those: the other slots repeat the first reference
        only to keep the batch's shape, and are ABSENT (read by no token)."""
        k = self.args.num_refs
        pick = sorted(D.choose(rng, range(len(boxes)), min(k, len(boxes))))
        lay = [boxes[j] for j in pick] + [ABSENT] * (k - len(pick))
        return pick + [pick[0]] * (k - len(pick)), lay

    def _ref_regions(self, layouts: Optional[list], n_tokens: int) -> Optional[torch.Tensor]:
        """The in-batch ``ref_regions`` of a batch's layouts (None when no target has one)."""
        if layouts is None:
            return None
        side = int(round(n_tokens ** 0.5))
        if side * side != n_tokens:
            raise D.DataError(f"'regions' need a square token grid, the model sees {n_tokens} "
                              f"image tokens")
        k = self.args.num_refs
        boxes = [[None] * k if l is None else [None if b is ABSENT else b for b in l]
                 for l in layouts]
        masks = region_masks(boxes, (side, side), num_slots=k)
        for i, l in enumerate(layouts):
            for j, b in enumerate(l or ()):
                if b is ABSENT:
                    masks[i, j] = False
        return masks.to(self.acc.device)

    def _dpo_batch(self, step: int):
        a, ds = self.args, self.ds
        rank = self.acc.process_index
        rng = D.step_rng(a.seed, step, rank, 1)
        rows: List[int] = []
        prompts: List[str] = []
        layouts: List[Optional[list]] = []    # per target (winner, loser): as in _gsa_batch
        for k in self.sampler.indices(step, rank):
            named = ds.references[k]
            boxes = ds.regions[k] if ds.regions else None
            if boxes is not None:
                # the candidates read every reference inside its box: so do winner and loser
                refs, lay = self._layout_pick(rng, boxes)
            else:
                refs = D.choose(rng, range(len(named)), a.num_refs)
                lay = None
            paths = [ds.winners[k], ds.losers[k]] + [named[j] for j in refs]
            rows += [self.path_index[p] for p in paths]
            prompts += [ds.prompts[k]] * len(paths)
            layouts += [lay, lay]
        return rows, prompts, (layouts if any(l is not None for l in layouts) else None)

    # -- steps ----------------------------------------------------------------------------

    def _forward(self, model, packed, text, pooled, sigma):
        with self.acc.autocast():
            return self.io.flux_forward(model, packed, text, pooled, sigma, self.img_ids,
                                        self.guidance)

    def _gsa_step(self, step: int):
        a = self.args
        G = a.num_refs + 1
        rows, prompts, layouts = self._gsa_batch(step)
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
        regions = self._ref_regions(layouts, x0.shape[1])
        with self.gsa.in_batch(group_size=G, num_targets=1, ref_regions=regions):
            pred = self._forward(self.model, packed.to(self.weight_dtype), text, pooled, sigma)
            err = L.flow_matching_errors(pred[tgt], x0[tgt], noise)
            loss = err.mean()
            self.acc.backward(loss)
        return loss.detach(), {"sigma": float(sigma_t.mean())}

    def _dpo_step(self, step: int):
        a = self.args
        G = a.num_refs + 2
        rows, prompts, layouts = self._dpo_batch(step)
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
        regions = self._ref_regions(layouts, x0.shape[1])
        with self.gsa.in_batch(group_size=G, num_targets=2, ref_regions=regions):
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
