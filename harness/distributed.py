"""Data-parallel training across processes (``torch.distributed``), for ``mdh train``.

A launch is distributed when the environment says ``WORLD_SIZE`` > 1; the variables are torchrun's
(``python -m torch.distributed.run --nproc_per_node N ...``) and those of the ``env://`` rendezvous:
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``. Any other
launcher that exports them works too: ``mdh sweep cluster=slurm`` with ``cluster.gpus_per_task=N`` (or
``cluster.tasks_per_node=N``) submits one SLURM job of N tasks per run, and each task exports them from
SLURM's before training (``harness.launch.export_torch_distributed_env``, through
``submitit.helpers.TorchDistributedEnvironment``). Without them (or with ``WORLD_SIZE=1``) nothing here does
anything and every helper is a no-op, so the one-process path is untouched.

``Distributed.from_env()`` reads the variables; ``.init(device_name)`` starts the process group (NCCL on
CUDA, Gloo on CPU; ``train.device`` decides) and returns this process's device; ``.close()`` tears it down.
The training loop uses ``rank`` / ``world_size`` / ``is_main``, ``barrier``, ``all_reduce_mean`` (logged
losses), ``all_reduce_max`` (the stop flag of a signal), ``broadcast_object`` (rank 0's verdicts),
``broadcast_module`` and ``average_gradients`` (see ``harness/train_step.py``).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from collections.abc import Iterable, Mapping

import torch

log = logging.getLogger(__name__)

# How long a collective may wait for the slowest rank (rank 0 alone runs the offline evaluation while the
# others wait): long, because a dead rank makes torchrun stop the others anyway.
DEFAULT_TIMEOUT_S = 3600
TIMEOUT_ENV = "MDH_DIST_TIMEOUT_S"


class DistributedError(RuntimeError):
    """The environment describes a distributed launch that cannot work; the message names the variable."""


def _int_env(environ: Mapping[str, str], key: str, default: int | None = None) -> int | None:
    raw = environ.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {key}={raw!r} is not an integer") from None


@dataclasses.dataclass
class Distributed:
    """This process's place in a data-parallel launch (``world_size`` 1: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None  # set by ``init``
    owns_group: bool = False  # ``init`` started the process group (so ``close`` ends it)

    # ------------------------------------------------------------------------------------ detection
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Distributed:
        """The launch the environment describes (torchrun's variables); ``WORLD_SIZE`` unset or 1 -> one
        process. Inconsistent values -> ``DistributedError`` naming them."""
        env = os.environ if environ is None else environ
        world = _int_env(env, "WORLD_SIZE", 1)
        if world is None or world <= 1:
            return cls()
        rank = _int_env(env, "RANK")
        if rank is None:
            raise DistributedError(f"WORLD_SIZE={world} but RANK is not set; launch with torchrun "
                                   "(python -m torch.distributed.run --nproc_per_node N ...)")
        if not 0 <= rank < world:
            raise DistributedError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise DistributedError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set (torchrun sets "
                                   "them; with submitit call submitit.helpers.TorchDistributedEnvironment()"
                                   ".export() in the job)")
        local_rank = _int_env(env, "LOCAL_RANK", 0)
        local_world = _int_env(env, "LOCAL_WORLD_SIZE", 1)
        return cls(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int] | None:
        """``(rank, world_size)`` for ``harness.level2`` (which slice of the global batch is ours), or None."""
        return (self.rank, self.world_size) if self.enabled else None

    # ------------------------------------------------------------------------------------ lifetime
    def device_for(self, name: str) -> torch.device:
        """The device of this rank for ``train.device`` = ``name``: "auto" -> CUDA when available; CUDA
        -> ``cuda:LOCAL_RANK`` (or ``cuda:0`` when the launcher left one GPU visible per process)."""
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(name)
        if device.type != "cuda" or not self.enabled:
            return device
        if not torch.cuda.is_available():
            return device  # resolve_device in harness/train.py reports it
        count = torch.cuda.device_count()
        index = self.local_rank if self.local_rank < count else 0 if count == 1 else None
        if index is None:
            raise DistributedError(f"LOCAL_RANK={self.local_rank} but this process sees {count} CUDA devices")
        if device.index is not None and device.index != index:
            log.warning("train.device=%s ignored in a distributed run: rank %d uses cuda:%d (LOCAL_RANK)",
                        name, self.rank, index)
        return torch.device("cuda", index)

    def init(self, device: torch.device | None) -> None:
        """Start the process group (no-op for one process, or when the caller already started one)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            self.backend = dist.get_backend()
            return
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=int(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S))
        dist.init_process_group(self.backend, init_method="env://", rank=self.rank, world_size=self.world_size,
                                timeout=timeout)
        self.owns_group = True
        log.info("rank %d of %d (local %d) on %s, backend %s", self.rank, self.world_size, self.local_rank,
                 device, self.backend)

    def close(self) -> None:
        """Tear down the process group ``init`` started (safe to call twice, and when nothing was started)."""
        if not self.owns_group:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False

    # ------------------------------------------------------------------------------------ collectives
    def _device(self) -> torch.device:
        """Where collective tensors live: NCCL needs them on this rank's GPU."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of ``values`` (any shape; a new tensor on the input's device)."""
        if not self.enabled:
            return values
        buf = values.detach().to(self._device(), torch.float64 if values.dtype == torch.float64 else torch.float32,
                                 copy=True)
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
        return (buf / self.world_size).to(values.device, values.dtype)

    def all_reduce_max(self, value: int) -> int:
        """The largest ``value`` of any rank (e.g. a signal number; 0 = none)."""
        if not self.enabled:
            return value
        buf = torch.tensor([value], dtype=torch.int64, device=self._device())
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.MAX)
        return int(buf.item())

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` (picklable) on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0, device=self._device())
        return box[0]

    def broadcast_module(self, module: torch.nn.Module, buffers_only: bool = False) -> None:
        """Copy rank 0's parameters (unless ``buffers_only``) and buffers to every rank, in place."""
        if not self.enabled:
            return
        tensors = [] if buffers_only else [p.data for p in module.parameters()]
        tensors += list(module.buffers())
        for group in _by_dtype(tensors).values():
            flat = torch.cat([t.detach().reshape(-1) for t in group]).to(self._device())
            torch.distributed.broadcast(flat, src=0)
            _unflatten_into(flat, group)

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace every gradient by its mean over ranks (one all-reduce per dtype, after backward).

        A parameter with no gradient on some rank counts as a zero gradient there; one with no gradient on
        any rank keeps ``grad = None`` (as in a one-process run, where the optimizer then skips it)."""
        if not self.enabled:
            return
        params = [p for p in params if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self._device())
        torch.distributed.all_reduce(present, op=torch.distributed.ReduceOp.SUM)
        for group in _by_dtype(grads).values():
            flat = torch.cat([g.reshape(-1) for g in group]).to(self._device())
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            flat /= self.world_size
            _unflatten_into(flat, group)
        for p, g, n in zip(params, grads, present.tolist()):
            if p.grad is None and n > 0:
                p.grad = g
            elif n == 0:
                p.grad = None


def _by_dtype(tensors: list[torch.Tensor]) -> dict[tuple, list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return groups


def _unflatten_into(flat: torch.Tensor, group: list[torch.Tensor]) -> None:
    offset = 0
    with torch.no_grad():
        for t in group:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n


__all__ = ["Distributed", "DistributedError"]
