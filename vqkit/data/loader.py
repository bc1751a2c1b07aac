"""Batches read ahead by worker processes, in exactly the order the caller asks for.

A folder set decodes (and resizes) one file per image; done in the training process, the
model waits for every JPEG. Here the batches are made by ``torch.utils.data.DataLoader``
workers, each batch still the function of its index (a step, or a slice of the set) that the
caller gives, so that a seeded run reads the very images it read without workers: batch ``s``
is ``dataset.batch(indices_of(s))`` whatever the number of workers, and a resumed run starts
the stream at its step. Under ``torchrun`` each process's ``indices_of`` names its own shard,
so each reads only that.

Workers are used for sets that are not in memory: by default (``workers=None``) only for sets
that decode files per item (``ImageSet.decodes``) read for a model on an accelerator,
``default_workers()`` of them; an explicit number applies to any set not in memory (a prepared
set on a slow disk, say). For a model on the CPU the default is none: its step already uses
every core, so workers only compete with it (``benchmarks/bench_data.py``, faces at 128 and 256
on 2 cores: 0.91x and 0.89x the steps/s of decoding in the training process). In-memory sets
are read in the calling process: slicing a tensor is faster than sending it between processes.

A worker's DataError (a corrupt file) reaches the caller as the same one-line DataError, not
as the DataLoader's traceback text.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from vqkit.data.files import DataError
from vqkit.errors import ConfigError

Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 (N, C, H, W), int64 (N,)
IndicesOf = Callable[[int], torch.Tensor]

# Batches each worker prepares ahead of use (the DataLoader's prefetch_factor): two keep a
# worker busy while the last one is taken; more only hold memory.
PREFETCH = 2


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the system tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers() -> int:
    """Worker processes that decode for a model on an accelerator: one per CPU this process may
    use, less one for the training process itself, at most 8 (beyond that JPEG decoding outruns
    the step and each worker holds a copy of the file list)."""
    return max(0, min(8, usable_cpus() - 1))


def workers_for(dataset, workers: int | None, device: torch.device | None = None) -> int:
    """The number of worker processes that read ``dataset`` for a model on ``device`` (None: the
    CPU) under a ``workers`` setting. None: ``default_workers()`` for a set that decodes files
    per item read for an accelerator, else none. In-memory sets are always read in the calling
    process."""
    if workers is not None and workers < 0:
        raise DataError(f"the number of data workers must be >= 0, got {workers}")
    if not dataset.lazy:
        return 0
    if workers is None:
        accelerated = device is not None and device.type != "cpu"
        return default_workers() if dataset.decodes and accelerated else 0
    return workers


def default_memory_limit() -> float:
    """GiB of decoded pixels that a command may hold in memory: a quarter of this machine's
    memory, shared between the processes of a data-parallel run on it (each holds a copy)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return total / 4 / processes / 2**30


@dataclass(kw_only=True)
class ReadConfig:
    """How a command reads its images; settings of the machine, not of the model, so that any
    value gives the same batches.

    Args:
        workers: processes that decode image files ahead of the training step (default: for a
            folder set and a model on a GPU, one per CPU less one; on the CPU none, as the step
            uses every core).
        in_memory_gib: decode a folder set into memory once when its pixels take at most this many
            GiB (default: a quarter of this machine's memory); larger sets are decoded per read.
    """

    workers: int | None = None
    in_memory_gib: float | None = None

    def __post_init__(self):
        super_post = getattr(super(), "__post_init__", None)
        if super_post is not None:
            super_post()
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.in_memory_gib is not None and self.in_memory_gib < 0:
            raise ConfigError(f"in_memory_gib must be >= 0, got {self.in_memory_gib}")

    @property
    def in_memory_bytes(self) -> int:
        gib = default_memory_limit() if self.in_memory_gib is None else self.in_memory_gib
        return int(gib * 2**30)


@dataclass
class _Failed:
    """A worker's DataError, returned rather than raised so that its message arrives intact."""

    message: str


class _BatchesOf(torch.utils.data.Dataset):
    """Item ``s`` is the batch ``dataset.batch(indices_of(s))``."""

    def __init__(self, dataset, indices_of: IndicesOf):
        self.dataset, self.indices_of = dataset, indices_of

    def __getitem__(self, s: int) -> Batch | _Failed:
        try:
            return self.dataset.batch(self.indices_of(s))
        except DataError as e:
            return _Failed(str(e))


def read_ahead(dataset, indices_of: IndicesOf, items: range, workers: int | None = None,
               device: torch.device | None = None) -> Iterator[Batch]:
    """Yield ``dataset.batch(indices_of(s))`` for each ``s`` in ``items``, in that order.

    Args:
        dataset: an ``ImageSet``.
        indices_of: batch index -> 1-D int64 tensor of item indices; must be picklable
            (a module-level function or a ``functools.partial`` of one) for the workers.
        items: the batch indices, in the order wanted.
        workers: worker processes (see ``workers_for``); 0 reads in the calling process.
        device: where the batches go (None: the CPU); for CUDA they come in page-locked memory.

    Yields:
        (uint8 (N, C, H, W), int64 (N,)) per item.
    """
    n_workers = workers_for(dataset, workers, device)
    pin_memory = device is not None and device.type == "cuda"
    if n_workers == 0:
        for s in items:
            images, labels = dataset.batch(indices_of(s))
            yield (images.pin_memory(), labels.pin_memory()) if pin_memory else (images, labels)
        return
    # batch_size=None: each item is already a batch; the sampler is the order itself. The
    # loader's own generator seeds its workers: drawn from the global RNG, that seed would shift
    # the random numbers of training (k-means seeding, code restarts) and break exact resumes.
    loader = torch.utils.data.DataLoader(
        _BatchesOf(dataset, indices_of), batch_size=None, sampler=items, num_workers=n_workers,
        prefetch_factor=PREFETCH, pin_memory=pin_memory, generator=torch.Generator())
    for batch in loader:
        if isinstance(batch, _Failed):
            raise DataError(batch.message)
        yield batch


def _slice(b: int, batch_size: int, n: int) -> torch.Tensor:
    return torch.arange(b * batch_size, min((b + 1) * batch_size, n))


def iter_batches(dataset, batch_size: int, limit: int | None = None, workers: int | None = None,
                 device: torch.device | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The first ``limit`` items of ``dataset`` (all by default) in order, in batches of
    ``batch_size`` (the last one shorter), read as ``read_ahead`` reads them: yields (index of
    the batch's first item, uint8 (N, C, H, W), int64 (N,))."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    count = -(-n // batch_size)
    indices_of = functools.partial(_slice, batch_size=batch_size, n=n)
    for b, (images, labels) in enumerate(read_ahead(dataset, indices_of, range(count), workers, device)):
        yield b * batch_size, images, labels


class StepBatches:
    """The training batches of steps ``start, start + 1, ...`` up to ``stop``, read ahead.

    ``get(step)`` returns ``dataset.batch(indices_of(step))``; asked for the step after the last
    one it returns the next batch of the stream, asked for any other step it starts a new stream
    there (a resumed or rewound run). ``close()`` (or leaving a ``with`` block) ends the workers.

    Args:
        dataset: an ``ImageSet``.
        indices_of: step -> the 1-D int64 indices of that step's batch (this process's shard);
            picklable, e.g. ``functools.partial(batch_indices, n=..., ...)``.
        stop: the step after the last one that will be asked for (the run's ``steps``).
        workers: worker processes (``workers_for``).
        device: the model's device (``read_ahead``).
    """

    def __init__(self, dataset, indices_of: IndicesOf, stop: int, workers: int | None = None,
                 device: torch.device | None = None):
        self.dataset, self.indices_of, self.stop = dataset, indices_of, stop
        self.workers, self.device = workers, device
        self._stream: Iterator[Batch] | None = None
        self._next = None

    def get(self, step: int) -> Batch:
        if self._stream is None or step != self._next:
            self.close()
            self._stream = read_ahead(self.dataset, self.indices_of, range(step, max(self.stop, step + 1)),
                                      self.workers, self.device)
        self._next = step + 1
        return next(self._stream)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()  # a DataLoader iterator shuts its workers down when closed
        self._stream = None

    def __enter__(self) -> StepBatches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
