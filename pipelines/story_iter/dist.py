"""Process group for multi-process Story-Iter runs (``accelerate launch`` / ``torchrun``).

The launcher sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; each process draws its share of a round's frames, writes them to disk,
and waits at a barrier before the next round reads them back.  Gloo on CPU, NCCL on
CUDA.  A single process (no launcher) needs no process group at all.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

__all__ = ["Dist", "init_dist"]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if self.backend == "nccl":
                import torch

                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()

    def broadcast_ok(self, ok: bool, message: str = "") -> None:
        """Every process learns whether the main process's check passed; the others stop
        with the same message (so one refusal does not leave peers waiting forever)."""
        if self.world <= 1:
            return
        import torch.distributed as dist

        box = [ok, message]
        dist.broadcast_object_list(box, src=0)
        if not box[0] and self.rank != 0:
            raise SystemExit(f"[rank {self.rank}] stopped: the main process refused: {box[1]}")

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def init_dist(device: Optional[str]) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    on_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    backend = "nccl" if on_cuda else "gloo"
    if on_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=2))
    return Dist(rank, world, local, backend)
