"""Data-parallel training on 2 gloo processes: identical ranks, equivalence with one process
on the doubled batch, exact resume, the CLI launcher and a failing rank ending the job; and
the quantizer alone in a process group: bare (never communicates), synced over uneven batches.

The 2-process runs happen once per fixture, in ``runs`` and ``quantizer_ranks`` (one spawn of
two workers that run several cases in turn), and the tests check what they left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from vqkit import distributed
from vqkit.cli.main import main
from vqkit.data.datasets import TensorImageSet, load_dataset, sample_dir
from vqkit.nn.quantize import VectorQuantizer, enable_sync
from vqkit.nn.vqvae import VQVAEConfig
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.codes import extract_codes, load_codes
from vqkit.training import loop
from vqkit.training import prior as train_prior_module
from vqkit.training import stage1 as train_module
from vqkit.training.prior import PriorTrainConfig, prior_config_for, train_prior
from vqkit.training.stage1 import TrainConfig, train

DATA = f"fashion-mnist:{sample_dir()}"
# K = 64 codes for 2 x 2 images of 7 x 7 latents, unused after 2 steps: codes die and are
# restarted from the global batch during the run, after k-means on the first one.
STAGE1 = VQVAEConfig(in_channels=1, hidden=8, res_hidden=4, num_res_blocks=1, downsample=2,
                     code_dim=4, codebook_size=64, ema=True, kmeans_init=True, restart_after=2)
PER_RANK = 2
STEPS = 6
PRIOR_STEPS = 4
WORLD = 2


def _images() -> TensorImageSet:
    sample = load_dataset(DATA, "train")
    return TensorImageSet("sample", sample.images[:64], sample.labels[:64], sample.class_names)


def _stage1(run: Path, steps: int, batch_size: int, resume: bool = False, precision: str = "fp32"):
    # On the CPU also where CUDA is present: the ranks of these tests share one machine's cores,
    # and CUDA's atomic-add kernels would not give the bit-identical results they compare.
    config = TrainConfig(data="sample", steps=steps, batch_size=batch_size, lr=1e-3, seed=3,
                         precision=precision, device="cpu")
    return train(run, STAGE1, config, resume=resume, dataset=_images(), progress=False, tensorboard=False)


def _prior(run: Path, codes_dir: Path, batch_size: int):
    codes = load_codes(codes_dir)
    config = PriorTrainConfig(codes=str(codes_dir), steps=PRIOR_STEPS, batch_size=batch_size, lr=3e-3,
                              eval_every=2, precision="fp32", device="cpu")
    # No dropout: its masks are drawn per process, so two processes of B and one of 2B differ.
    sizes = dict(channels=8, layers=1, dropout=0.0)
    return train_prior(run, prior_config_for(codes, "pixelsnail", False, **sizes), config,
                       progress=False, tensorboard=False)


def _spy_on_ranks(root: Path, rank: int) -> None:
    """Save every rank's model at the end of each run (``root/RUN-rankR.safetensors``; a prior's
    averaged weights, which its checkpoints hold) and count the codes restarted
    (``root/restarts-rankR.json``)."""
    for module in (train_module, train_prior_module):
        real_loop = module.run_loop

        def run_loop(run_dir, model, *args, _real=real_loop, **kwargs):
            result = _real(run_dir, model, *args, **kwargs)
            saved = model if kwargs.get("average") is None else kwargs["average"].module
            weights = {k: v.contiguous() for k, v in saved.state_dict().items()}
            save_file(weights, str(root / f"{Path(run_dir).name}-rank{rank}.safetensors"))
            return result

        module.run_loop = run_loop
    real_restart = VectorQuantizer._restart_dead_codes
    restarted = []

    def restart(self, flat, counts):
        real_restart(self, flat, counts)
        restarted.append(int((self.unused_steps == 0).sum() - (counts > 0).sum()))
        (root / f"restarts-rank{rank}.json").write_text(json.dumps(sum(restarted)))

    VectorQuantizer._restart_dead_codes = restart


def _scheduled_loop(root: Path, rank: int) -> None:
    """A cosine-scheduled run under a time budget whose ranks' clocks disagree (rank 1's runs
    3x as fast); its steps and rates go to ``root/scheduled-rankR.json``."""
    rates = []
    loop.CLOCKS["cpu"] = lambda: 10.0 * len(rates) * (1 + 2 * rank)
    model = torch.nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    def step_fn(*_) -> loop.StepOutput:
        rates.append(optimizer.param_groups[0]["lr"])
        return loop.StepOutput(-model.weight.sum(), {})

    result = loop.run_loop(root / "scheduled", model, optimizer, 0, steps=1000, time_budget=40.0, clock="cpu",
                           checkpoint_every=1000, log_every=1000, step_fn=step_fn,
                           board=loop.TensorBoard(root, False), progress=False, lr=0.1, schedule="cosine")
    (root / f"scheduled-rank{rank}.json").write_text(json.dumps({"step": result.step, "rates": rates}))


def _worker(rank: int, root: str, codes_dir: str) -> None:
    torch.set_num_threads(1)
    root = Path(root)
    dist.init_process_group("gloo", init_method=f"file://{root / 'store'}", rank=rank, world_size=WORLD)
    try:
        _spy_on_ranks(root, rank)
        _stage1(root / "straight", STEPS, PER_RANK)
        _stage1(root / "resumed", STEPS // 2, PER_RANK)
        _stage1(root / "resumed", STEPS, PER_RANK, resume=True)
        _prior(root / "prior", Path(codes_dir), PER_RANK)
        _scheduled_loop(root, rank)
        _stage1(root / "bf16", STEPS, PER_RANK, precision="bf16")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def codes_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("codes")
    config = dataclasses.replace(STAGE1, restart_after=0)
    train(root / "run", config, TrainConfig(data="sample", steps=5, batch_size=8, device="cpu"), dataset=_images(),
          progress=False, tensorboard=False)
    model, checkpoint = ckpt.load_model(root / "run")
    source = {"run": str(root / "run"), "fingerprint": checkpoint.state["fingerprint"], "data": DATA,
              "split": "train"}
    extract_codes(model, _images(), root / "codes", progress=False, source=source)
    return root / "codes"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, codes_dir) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    _spawn(_worker, (str(root), str(codes_dir)), timeout=300)
    return root


def _ranks(root: Path, run: str) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(root / f"{run}-rank{r}.safetensors")) for r in range(WORLD)]


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_every_rank_holds_bit_identical_codebooks_and_parameters(runs):
    for run in ("straight", "resumed", "prior", "bf16"):
        rank0, rank1 = _ranks(runs, run)
        _assert_identical(rank0, rank1)
    # k-means and dead-code restarts happened, so they too were kept in step.
    assert json.loads((runs / "restarts-rank0.json").read_text()) > 0
    assert not torch.equal(_ranks(runs, "straight")[0]["quantizers.0.ema_count"], torch.ones(64))


def test_rank0_alone_writes_the_run_and_its_checkpoint_is_the_ranks_model(runs):
    model, checkpoint = ckpt.load_model(runs / "straight")
    assert checkpoint.step == STEPS
    _assert_identical(model.state_dict(), _ranks(runs, "straight")[0])
    saved = ckpt.read_config(runs / "straight")
    assert saved["processes"] == WORLD and saved["train"]["batch_size"] == PER_RANK


def test_distributed_resume_is_bit_identical_to_the_straight_run(runs):
    _assert_identical(_ranks(runs, "resumed")[0], _ranks(runs, "straight")[0])


def test_two_processes_of_batch_b_match_one_process_of_batch_2b(runs, tmp_path, codes_dir):
    # In float32: same images per step, same k-means, restarts and EMA on the global
    # statistics; only the order of float sums differs (per-rank sums all-reduced, gradients averaged by DDP), so
    # the weights agree to float32 rounding amplified over a few Adam steps.
    _stage1(tmp_path / "single", STEPS, WORLD * PER_RANK)
    single = ckpt.load_model(tmp_path / "single")[0].state_dict()
    for key, value in _ranks(runs, "straight")[0].items():
        if value.is_floating_point():
            torch.testing.assert_close(value, single[key], rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(value, single[key]), key
    _prior(tmp_path / "prior", codes_dir, WORLD * PER_RANK)
    single = load_file(str(ckpt.latest_checkpoint(tmp_path / "prior").path / "model.safetensors"))
    for key, value in _ranks(runs, "prior")[0].items():
        torch.testing.assert_close(value, single[key], rtol=1e-4, atol=1e-5, msg=key)


def test_rank0_s_clock_sets_every_rank_s_stop_and_learning_rate(runs):
    # Rank 0 reads 10 s per step against a 40 s budget: steps 0..4 at progress k / 4. On its own
    # clock rank 1 would stop after 2 steps, at other rates (and the ranks' collectives part).
    expected = [0.1 * loop.lr_factor("cosine", k / 4) for k in range(5)]
    for r in range(WORLD):
        record = json.loads((runs / f"scheduled-rank{r}.json").read_text())
        assert record["step"] == 5 and record["rates"] == pytest.approx(expected)


def test_ranks_take_disjoint_slices_of_the_global_batch():
    for step in range(7):
        whole = loop.batch_indices(step, 50, 12, seed=1)
        shards = [loop.batch_indices(step, 50, 4, seed=1, rank=r, world_size=3) for r in range(3)]
        assert torch.equal(torch.cat(shards), whole)
    assert torch.equal(loop.batch_indices(3, 50, 8, seed=1), loop.batch_indices(3, 50, 8, seed=1, rank=0, world_size=1))


def test_resuming_needs_the_same_global_batch(runs, tmp_path):
    # A 2 x 2 run resumes in one process with batch 4 (same data order), not with batch 2.
    import shutil
    run = tmp_path / "run"
    shutil.copytree(runs / "straight", run)
    with pytest.raises(distributed.DistributedError, match=r"global batch of 4 \(2 x 2 process"):
        _stage1(run, STEPS + 2, PER_RANK, resume=True)
    assert _stage1(run, STEPS + 2, WORLD * PER_RANK, resume=True).step == STEPS + 2


def _cli(*args: str, env_extra: dict | None = None, script: list[str] | None = None, timeout: float = 120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *(script or ["-m", "vqkit"]), *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def test_cli_nproc_launches_torchrun(tmp_path):
    out = tmp_path / "run"
    result = _cli("train", "--data", DATA, "--preset", "demo", "-o", str(out), "--steps", "4",
                  "--batch-size", "4", "--nproc", "2", "--no-tensorboard", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("done: step 4") == 1  # rank 0 alone reports
    assert ckpt.read_config(out)["processes"] == 2 and ckpt.latest_checkpoint(out).step == 4


def test_a_failing_rank_ends_the_job_with_its_error(tmp_path):
    # Rank 1 raises at its third batch while rank 0 waits in a collective with a 300 s timeout:
    # torchrun must end rank 0, not the timeout (the subprocess timeout turns a hang into a
    # failure), and the error must name the rank.
    result = _failing_job(tmp_path, "raise", timeout=300)
    assert result.returncode != 0
    assert "vqkit: error: rank 1 failed: cannot read batch 2 (injected)" in result.stderr
    assert "rank 0 failed" not in result.stderr
    assert not (tmp_path / "run" / "latest").exists()


def test_a_rank_that_stops_answering_ends_the_job_at_the_timeout(tmp_path):
    result = _failing_job(tmp_path, "hang", timeout=3)
    assert result.returncode != 0
    assert "vqkit: error: rank 0 stopped: the other processes stopped answering" in result.stderr


def _failing_job(tmp_path: Path, failure: str, timeout: float) -> subprocess.CompletedProcess:
    script = Path(__file__).with_name("ddp_failing_rank.py")
    return _cli("--standalone", "--nproc_per_node=2", str(script), "train", "--data", DATA,
                "--preset", "demo", "-o", str(tmp_path / "run"), "--steps", "20", "--batch-size", "4",
                "--no-tensorboard", "--device", "cpu", "--dist-timeout", str(timeout), env_extra={"FAILURE": failure},
                script=["-m", "torch.distributed.run"], timeout=45)


def test_setup_gives_each_process_a_gpu_of_its_own_or_refuses(monkeypatch):
    """Under torchrun a process takes the GPU of its LOCAL_RANK; one without a GPU is a clear
    error before any collective, unless the run is on the CPU, whose processes join over gloo."""
    joined, taken = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "active", lambda group=None: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", taken.append)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: joined.append(backend))
    monkeypatch.setenv("LOCAL_RANK", "1")
    refusal = r"process 1 .* 1 CUDA device\(s\) for 2 processes.*--device cpu"
    with pytest.raises(distributed.DistributedError, match=refusal):
        distributed.setup(device="auto")
    assert joined == [] and taken == []
    assert distributed.setup(device="cpu") and joined == ["gloo"] and taken == []
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.setup(device="cuda") and joined == ["gloo", "cpu:gloo,cuda:nccl"] and taken == [0]


def test_ddp_is_built_without_the_buffer_broadcast_on_this_torch():
    """The keyword that turns DDP's buffer broadcast off exists in this torch's DDP (its name
    changed in torch 2.13): an unknown one is a TypeError at the first distributed run."""
    import inspect
    [(name, value)] = distributed._NO_BUFFER_SYNC.items()
    assert value is False and name in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters


def test_helpers_are_no_ops_in_one_process():
    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    t = torch.arange(5.0)
    assert distributed.all_reduce_sum(t) is t
    assert torch.equal(distributed.rows_of_global_batch(t.reshape(5, 1), torch.tensor([4, 0])),
                       torch.tensor([[4.0], [0.0]]))
    assert distributed.batch_sizes(5) == [5]
    assert distributed.mean_over_ranks({"loss": 1.5}) == {"loss": 1.5}
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model) is model
    assert main(["train", "--data", DATA, "-o", "unused", "--nproc", "0"]) == 2


# The quantizer on its own. K = 16 codes for at most 12 vectors a step: codes go unused and are
# restarted every step (restart_after=1), after k-means on the first batch that has vectors.
QUANTIZER = dict(codebook_size=16, dim=3, kmeans_init=True, kmeans_iters=3, restart_after=1, channel_dim=-1)
# Sequences (B, 2, 3) per rank and step: an empty global batch (k-means waits), uneven batches,
# an empty rank on either side (rank 0 empty still chooses the rows), then even ones.
SHARDS = [(0, 0), (5, 3), (0, 6), (4, 0), (3, 3)]


def _global_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randn(sum(sizes), 2, 3, generator=g) for sizes in SHARDS]


def _shards(rank: int) -> list[torch.Tensor]:
    return [batch[sum(sizes[:rank]):sum(sizes[:rank + 1])] for batch, sizes in zip(_global_batches(), SHARDS)]


# VQ's options with state of their own: k-means, EMA and restarts in a projected, normalised space.
OPTIONS = dict(cosine=True, factor_dim=2, rotation=True)


def _train_quantizer(batches: list[torch.Tensor], ema: bool, draws: int, sync=False,
                     group=None, **options) -> dict[str, torch.Tensor]:
    """The state after training on ``batches``: the same initial codebook everywhere, then the
    k-means seeds and restarts drawn from the global RNG seeded with ``draws``."""
    torch.manual_seed(0)
    q = VectorQuantizer(**QUANTIZER, ema=ema, sync=sync, **options)
    if group is not None:
        assert enable_sync(q, group) == 1
    torch.manual_seed(draws)
    for z_e in batches:
        q(z_e)
    return {k: v.clone() for k, v in q.state_dict().items()}


def _draws(rank: int) -> int:
    # Each rank's RNG differs, so the synced runs agree only if rank 0 chooses for all.
    return 100 + rank


@contextlib.contextmanager
def _collectives(check):
    """Every torch.distributed collective calls ``check(group)`` first while inside."""
    names = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_object", "barrier")
    saved = {name: getattr(dist, name) for name in names}

    def spy(real):
        def collective(*args, group=None, **kwargs):
            check(group)
            return real(*args, group=group, **kwargs)
        return collective

    try:
        for name in names:
            setattr(dist, name, spy(saved[name]))
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def _refuse(group) -> None:
    raise AssertionError("a collective was called")


def _quantizer_worker(rank: int, root: str) -> None:
    torch.set_num_threads(1)
    root = Path(root)
    dist.init_process_group("gloo", init_method=f"file://{root / 'store'}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        pair = dist.new_group([0, 1])
        alone = [dist.new_group([r]) for r in range(WORLD)][rank]  # every process makes every group
        results = {}
        with _collectives(_refuse):
            for ema in (False, True):
                results[f"bare-{ema}"] = _train_quantizer(_shards(rank), ema, _draws(rank))
                results[f"alone-{ema}"] = _train_quantizer(_shards(rank), ema, _draws(rank), sync=alone)
        groups = []
        with _collectives(groups.append):
            for ema in (False, True):
                results[f"synced-{ema}"] = _train_quantizer(_shards(rank), ema, _draws(rank), sync=True)
                results[f"options-{ema}"] = _train_quantizer(_shards(rank), ema, _draws(rank), sync=True, **OPTIONS)
        assert groups and all(g is None for g in groups)
        groups.clear()
        with _collectives(groups.append):
            for ema in (False, True):
                results[f"pair-{ema}"] = _train_quantizer(_shards(rank), ema, _draws(rank), group=pair)
        assert groups and all(g is pair for g in groups)  # the same processes, but not the default group
        save_file({f"{case}/{key}": value for case, state in results.items() for key, value in state.items()},
                  str(root / f"quantizers-rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _spawn(fn, args: tuple, timeout: float) -> None:
    """``mp.spawn`` that fails the test instead of hanging when the processes do not finish."""
    context = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(deadline - time.monotonic(), 0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} processes were still running after {timeout:.0f} s")


@pytest.fixture(scope="module")
def quantizer_ranks(tmp_path_factory) -> list[dict[str, dict[str, torch.Tensor]]]:
    root = tmp_path_factory.mktemp("quantizers")
    _spawn(_quantizer_worker, (str(root),), timeout=120)
    ranks = []
    for r in range(WORLD):
        cases: dict[str, dict[str, torch.Tensor]] = {}
        for name, value in load_file(str(root / f"quantizers-rank{r}.safetensors")).items():
            case, key = name.split("/")
            cases.setdefault(case, {})[key] = value
        ranks.append(cases)
    return ranks


@pytest.mark.parametrize("ema", [False, True])
def test_a_bare_quantizer_in_a_process_group_never_communicates(quantizer_ranks, ema):
    # The worker ran these with every collective raising; each rank's quantizer followed its
    # own shard exactly, as one process alone would, so the ranks' codebooks differ.
    for case in ("bare", "alone"):  # alone: sync over a group of one process
        for r in range(WORLD):
            _assert_identical(quantizer_ranks[r][f"{case}-{ema}"], _train_quantizer(_shards(r), ema, _draws(r)))
        assert not torch.equal(quantizer_ranks[0][f"{case}-{ema}"]["codebook"],
                               quantizer_ranks[1][f"{case}-{ema}"]["codebook"])


@pytest.mark.parametrize("ema", [False, True])
def test_synced_quantizers_follow_the_global_batch_over_uneven_shards(quantizer_ranks, ema):
    # Bit-identical on both ranks, and the run of one process on the whole batches with rank
    # 0's draws: the same k-means seeds and restarted rows (chosen over the true total, zero-row
    # ranks included); only the order of float sums differs (per-rank sums all-reduced).
    single = _train_quantizer(_global_batches(), ema, _draws(0))
    options = _train_quantizer(_global_batches(), ema, _draws(0), **OPTIONS)
    assert bool(single["initialized"]) and single["unused_steps"].eq(0).all()  # restarts ran
    # pair: an explicit ProcessGroup via enable_sync; options: cosine, factorised, rotation.
    for case, reference in (("synced", single), ("pair", single), ("options", options)):
        rank0, rank1 = (quantizer_ranks[r][f"{case}-{ema}"] for r in range(WORLD))
        _assert_identical(rank0, rank1)
        for key, value in rank0.items():
            if value.is_floating_point():
                torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6, msg=key)
            else:
                assert torch.equal(value, reference[key]), key
