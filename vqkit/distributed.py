"""Data-parallel training on ``torch.distributed``: one process per GPU (or several processes
on a CPU, with gloo), launched by ``torchrun``, each training on its own shard of every batch.

The process group is the one ``torchrun`` describes in the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): where CUDA is available,
each process takes the GPU of its ``LOCAL_RANK`` and CUDA tensors go through NCCL, CPU
tensors through gloo; without CUDA everything goes through gloo. Gradients are averaged
by ``DistributedDataParallel``; the EMA codebook, which is not a parameter, is kept identical
on every process by all-reducing its batch statistics, which a quantizer does only when asked
(``quantize.enable_sync``, which ``train.stage1`` calls under ``torchrun``).

Data sharding: batch ``s`` of a run of W processes with ``batch_size`` B each is the global
batch of W*B images that ``train.batch_indices`` deals out of the ``(seed, epoch)``
permutation, and rank r takes rows ``[r*B, (r+1)*B)`` of it. This is what
``DistributedSampler`` with per-epoch shuffling does (each epoch a fresh permutation, split
between the processes with no overlap), but the order stays a function of the step alone, so
that resuming is exact and W processes with batch B see exactly the images that one process
with batch W*B sees.

Every helper is a no-op (returns its input, rank 0, world size 1) outside a process group of
two or more, so that single-process code pays nothing for them. Those that take a ``group``
work within that ``torch.distributed`` process group (ranks are ranks in it); the default,
None, is the group of all processes, as in ``torch.distributed``.
"""

from __future__ import annotations

import datetime
import inspect
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from vqkit.errors import UsageError, VqkitError

# Seconds a process waits in a collective before it gives up: long enough for rank 0 to write
# a checkpoint or evaluate a prior while the others wait, short enough that a lost process
# ends the job instead of hanging it.
DEFAULT_TIMEOUT = 600.0


class DistributedError(VqkitError, ValueError):
    """The processes of a run disagree (a different checkpoint, too small a data set)."""


def launched() -> bool:
    """Whether this process was started by ``torchrun`` as one of two or more."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active(group=None) -> bool:
    """Whether a process group of two or more processes is running (``group``, or all
    processes)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, the one process that writes checkpoints, logs and images."""
    return rank() == 0


def setup(timeout: float = DEFAULT_TIMEOUT, device: str = "auto") -> bool:
    """Join the process group that ``torchrun`` describes in the environment, once; a no-op
    when not launched by ``torchrun`` or already joined. Returns whether training is
    distributed. ``timeout`` (seconds) bounds every collective; ``device`` is the run's
    setting: unless it is ``cpu``, each process takes the GPU of its ``LOCAL_RANK``, and a
    process that has none is an error (two processes on one GPU would fail inside NCCL)."""
    if active() or not launched():
        return active()
    if timeout <= 0:
        raise UsageError(f"the distributed timeout must be positive, got {timeout}")
    if device != "cpu" and torch.cuda.is_available():
        local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= gpus:
            raise DistributedError(
                f"process {local} of this machine has no GPU of its own: {gpus} CUDA device(s) for "
                f"{os.environ.get('LOCAL_WORLD_SIZE', '?')} processes; start at most {gpus} (--nproc), "
                "or train on the CPU (--device cpu)")
        torch.cuda.set_device(local)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return True


def shutdown() -> None:
    """Leave the process group, once every process has come here: a process that tore its
    group down while another still used it has ended in ``std::terminate`` in gloo's threads."""
    if dist.is_available() and dist.is_initialized():
        if active():
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` over the processes of ``group`` (all of them by default), in place;
    returns it."""
    if active(group):
        dist.all_reduce(tensor, group=group)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over all processes, in place; returns it."""
    if active():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``tensor`` on every process, in place; returns it."""
    if active():
        dist.broadcast(tensor, src=src)
    return tensor


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean of each scalar over all processes (one collective for the whole dict)."""
    if not active() or not values:
        return values
    stacked = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / world_size()).tolist()))


def batch_sizes(n: int, group=None, device: torch.device | str = "cpu") -> list[int]:
    """The number of rows ``n`` that each process of ``group`` holds, in rank order (one
    all-gather of an int64 on ``device``, which must suit the group's backend: a CUDA device
    for NCCL). ``[n]`` outside a group."""
    if not active(group):
        return [n]
    mine = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, mine, group=group)
    return [int(size) for size in sizes]


def rows_of_global_batch(local: torch.Tensor, picks: torch.Tensor, sizes: list[int] | None = None,
                         group=None) -> torch.Tensor:
    """Rows ``picks`` of the global batch, on every process of ``group``.

    The global batch is every process's ``local`` (N_r, D...) stacked in rank order; the
    processes may hold different numbers of rows, none included. ``sizes`` are the N_r
    (``batch_sizes``, gathered here when not given) and ``picks`` index the global batch, in
    ``[0, sum(sizes))``. Rank 0's picks are broadcast so that all processes choose the same
    rows; each fills in the rows it holds, zeros elsewhere, and a sum all-reduce assembles
    them. The result is exact (every entry is one value plus zeros) and costs
    ``len(picks) x D``, not the whole batch.
    """
    if not active(group):
        return local[picks]
    if sizes is None:
        sizes = batch_sizes(local.shape[0], group, local.device)
    me = dist.get_rank(group)
    if len(sizes) != dist.get_world_size(group) or sizes[me] != local.shape[0]:
        raise DistributedError(f"rank {me} holds {local.shape[0]} rows but the batch sizes "
                               f"given are {sizes} for {dist.get_world_size(group)} processes")
    dist.broadcast(picks, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    start = sum(sizes[:me])
    mine = (picks >= start) & (picks < start + sizes[me])
    rows = torch.zeros(len(picks), *local.shape[1:], dtype=local.dtype, device=local.device)
    rows[mine] = local[picks[mine] - start]
    dist.all_reduce(rows, group=group)
    return rows


def lost_peers(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another process died or stopped
    answering (a consequence, to be reported as such, not a cause)."""
    if isinstance(error, dist.DistError):
        return True
    # gloo reports a closed peer or a timeout as a plain RuntimeError.
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "Timed out"))


def barrier() -> None:
    if active():
        dist.barrier()


def check_same(value: int, what: str, hint: str = "") -> None:
    """Raise ``DistributedError`` on every process unless all hold the same ``value``."""
    if not active():
        return
    values = [None] * world_size()
    dist.all_gather_object(values, int(value))
    if len(set(values)) > 1:
        detail = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise DistributedError(f"the processes disagree on {what} ({detail}){hint}")


def check_global_batch(n: int, batch_size: int, what: str) -> None:
    """Every process needs a full shard: the data must hold at least one global batch."""
    if active() and n < batch_size * world_size():
        raise DistributedError(f"{what}: {n} examples are fewer than one global batch of "
                               f"{world_size()} processes x {batch_size}; lower --batch-size")


def check_resume_batch(saved_train: dict, processes: int | None, batch_size: int, path: Path) -> None:
    """A resumed run keeps its data order only with the same global batch (``batch_size`` x
    processes), whatever the split between processes (``processes`` None: an older run, 1)."""
    saved = int(saved_train.get("batch_size", 0)) * int(processes or 1)
    now = batch_size * world_size()
    if saved != now:
        raise DistributedError(
            f"{path}: the run used a global batch of {saved} ({saved_train.get('batch_size')} x "
            f"{processes or 1} process(es)) but this one has {now} ({batch_size} x {world_size()}); "
            "resume with --batch-size x processes equal to the run's")


class _Method(nn.Module):
    """Routes ``forward`` to another method of ``module`` (e.g. a prior's ``nll``), so that
    DistributedDataParallel, which only watches ``forward``, synchronises it."""

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        self.module, self.method = module, method

    def forward(self, *args, **kwargs):
        return getattr(self.module, self.method)(*args, **kwargs)


# torch 2.13 renamed DDP's broadcast_buffers to forward_sync_buffers (the old name warns there);
# earlier versions know only the old one.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})

def wrap(model: nn.Module, method: str = "forward", unused_parameters: bool = False):
    """``model`` in ``DistributedDataParallel`` when training is distributed, else the callable
    ``model.<method>`` itself. Call the result instead of the model in the training step.

    Buffers are not broadcast from rank 0 before each forward: the EMA codebook is kept
    identical by its own all-reduce, which the tests check bit for bit. ``unused_parameters``:
    the model may hold parameters that take no part in the loss (PixelSNAIL's position
    encoding without an attention layer); DDP then searches the graph for them every step.
    """
    if not active():
        return model if method == "forward" else getattr(model, method)
    module = model if method == "forward" else _Method(model, method)
    # A convolution with one input channel (grey images) gets weight gradients whose strides
    # differ from the bucket's only along that size-1 dimension: the same memory layout. With
    # channels_last the layouts do differ and DDP copies each gradient into its bucket, a cost
    # that benchmarks/bench_distributed.py measures rather than a fault to warn about.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    where = next(model.parameters()).device
    if where.type == "cuda" and where.index != torch.cuda.current_device():
        raise DistributedError(f"rank {rank()}: the model is on {where} but this process's GPU is "
                               f"cuda:{torch.cuda.current_device()} (LOCAL_RANK); under torchrun "
                               "leave --device at auto or cuda")
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[where.index] if where.type == "cuda" else None,
        find_unused_parameters=unused_parameters, **_NO_BUFFER_SYNC)



def launch(nproc: int, argv: list[str]) -> int:
    """Run ``vqkit ARGV`` in ``nproc`` processes on this machine under ``torchrun``
    (``--standalone``: a local rendezvous on a free port); returns its exit status. torchrun
    ends every process when one fails and names the failed rank."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "vqkit", *argv]
    return subprocess.run(command).returncode
