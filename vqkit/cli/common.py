"""Options and helpers that several command groups share."""

from __future__ import annotations

import sys
from pathlib import Path

from vqkit import distributed
from vqkit.precision import PRECISIONS
from vqkit.runs import checkpoint as ckpt
from vqkit.training.loop import CLOCKS, SCHEDULES

# The values the fields of every training run (RunConfig) take.
RUN_CHOICES = {"precision": PRECISIONS, "clock": tuple(CLOCKS), "schedule": SCHEDULES}

DATA_HELP = ("dataset as KIND:DIR with KIND one of mnist, fashion-mnist, cifar10, folder, prepared "
             "(a set made by vqkit prepare; e.g. cifar10:../shared/data/cifar10)")
SPLITS = ["train", "test", "all"]


def run_and_data(sp, need_data: bool = False) -> None:
    """RUN, --data (default: the run's training data) and --split (default test)."""
    sp.add_argument("run", type=Path, help="run folder written by vqkit train")
    sp.add_argument("--data", required=need_data, help=DATA_HELP + "; default: the run's training data")
    sp.add_argument("--split", default="test", choices=SPLITS)


def device_arg(sp) -> None:
    """--device: where a command's models run."""
    sp.add_argument("--device", default="auto",
                    help="where the models run: auto (CUDA when present, else the CPU), cpu, cuda or cuda:N")


def announce_placement(config) -> None:
    """Print, once per job, where a training run's steps will run (device, number format and
    layout): a GPU user's first question, which the logs answer only with --verbose."""
    if distributed.is_main():
        print(f"training on {config.placement().describe()}")


def distributed_args(sp) -> None:
    sp.add_argument("--nproc", type=int, default=1,
                    help="train data-parallel in this many processes on this machine (launches "
                         "torchrun; --batch-size is per process); for several machines run "
                         "torchrun -m vqkit ... yourself")
    sp.add_argument("--dist-timeout", type=float, default=distributed.DEFAULT_TIMEOUT,
                    help="seconds a process waits for the others before the job fails "
                         f"(default {distributed.DEFAULT_TIMEOUT:.0f})")


def eval_data(args, run: Path) -> str:
    return args.data or ckpt.read_config(run)["train"]["data"]


def image_size(run: Path) -> int | None:
    return ckpt.read_config(run).get("train", {}).get("image_size")


def save_eval_record(run: Path, checkpoint: ckpt.Checkpoint, record: dict) -> None:
    """Keep the figures in RUN/eval.json for vqkit report; a read-only run only loses that."""
    try:
        ckpt.save_eval(run, {"step": checkpoint.step, "fingerprint": checkpoint.state.get("fingerprint"),
                        **record})
    except OSError as e:
        print(f"vqkit: warning: could not save {run / 'eval.json'} ({e})", file=sys.stderr)


def checkpoint_arg(sp) -> None:
    """--checkpoint: which checkpoint of a prior run to use."""
    sp.add_argument("--checkpoint", choices=ckpt.CHECKPOINT_CHOICES, default=ckpt.BEST,
                    help="(prior runs) the checkpoint to use: best, the lowest held-out NLL of training "
                         "(default; a run without one uses its latest), or latest")


def workers_arg(sp) -> None:
    """--workers: processes that decode a folder set ahead of the model."""
    sp.add_argument("--workers", type=int,
                    help="processes that decode image files ahead of the model (default: for a folder set "
                         "and a model on a GPU one per CPU less one; on the CPU none, as the model uses every core)")
