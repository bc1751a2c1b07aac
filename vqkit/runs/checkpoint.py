"""Run folders: weights as safetensors, configuration as JSON, atomic checkpoints.

Layout of a run folder::

    config.json                      {"kind": "vqvae", "model": {...}, "train": {...}}
    latest                           name of the newest complete checkpoint
    best                             name of the checkpoint with the best held-out score, for
                                     runs that measure one (priors; see ``validation.json``)
    validation.json                  every held-out measurement of the run: step and value
    checkpoints/step-00001000/
        model.safetensors            weights and buffers (codebook, EMA statistics); in a run
                                     that averages its weights, the average (what commands use)
        training.safetensors         optimizer tensors and RNG state, for resuming; in a run
                                     that averages, also the trained weights ("trained.*")
        state.json                   step, optimizer hyperparameters, fingerprint, metrics

A checkpoint is written into a temporary folder, renamed into place, and only then named in
``latest`` (and ``best``); killing the process at any instant leaves the previous checkpoint
loadable. Pruning keeps the newest ``KEEP_CHECKPOINTS`` and the one ``best`` names.
Nothing is unpickled: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vqkit.errors import ConfigError, UsageError, VqkitError
from vqkit.fsutil import atomic_write_text, fsync_dir, fsync_file
from vqkit.nn.classifier import Classifier, ClassifierConfig
from vqkit.nn.pretrained import fit_state_dict
from vqkit.nn.vqvae import CONFIGS, VQ_KINDS, VQVAE, StageOneConfig, build_model
from vqkit.prior import Prior, PriorConfig, build_prior

FORMAT_VERSION = 1
KEEP_CHECKPOINTS = 2
# The files naming a checkpoint: the newest, and the best by held-out score.
LATEST, BEST = "latest", "best"
VALIDATION_FILE = "validation.json"
# Stage-1 run kinds.
STAGE1_KINDS = tuple(CONFIGS)
# The trained weights' prefix in training.safetensors when model.safetensors holds their
# average (``vqkit.training.averaging``).
TRAINED_PREFIX = "trained."


class CheckpointError(VqkitError, ValueError):
    """A run folder or checkpoint that cannot be used; the message names the file."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: where it lives, its step and the JSON state saved with it."""

    path: Path
    step: int
    state: dict


def fingerprint(path: Path) -> str:
    """sha256 of a weights file: identifies the exact model that produced codes or files."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_run_config(run_dir: Path, kind: str, model: dict, train: dict, **extra) -> None:
    """Write ``config.json`` for a run of ``kind`` ("vqvae", "prior", ...)."""
    data = {"format_version": FORMAT_VERSION, "kind": kind, "model": model, "train": train, **extra}
    atomic_write_text(Path(run_dir) / "config.json", json.dumps(data, indent=2) + "\n")


def write_config(run_dir: Path, model_config: StageOneConfig, train_config: dict, **extra) -> None:
    write_run_config(run_dir, model_config.kind, model_config.to_dict(), train_config, **extra)


def run_kind(run_dir: Path) -> str | None:
    """The ``kind`` a run folder's config.json declares, or None if it has none."""
    try:
        return json.loads((Path(run_dir) / "config.json").read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def _read_json(path: Path, error: type[Exception], missing: str):
    """The JSON value in ``path``; a missing or unreadable file is ``error`` naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None


def read_config(run_dir: Path, kind: str | tuple[str, ...] = STAGE1_KINDS) -> dict:
    path = Path(run_dir) / "config.json"
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder")
    data = _read_json(path, CheckpointError, f"missing; {run_dir} is not a vqkit run folder")
    if not isinstance(data, dict) or "model" not in data:
        raise CheckpointError(f"{path}: not a vqkit run configuration")
    kinds = (kind,) if isinstance(kind, str) else kind
    if data.get("kind") not in kinds:
        raise CheckpointError(f"{path}: this is a {data.get('kind')!r} run, expected a "
                              f"{' or '.join(repr(k) for k in kinds)} run")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {data.get('format_version')} is not "
                              f"supported (this vqkit reads version {FORMAT_VERSION})")
    return data


def model_config_of(run_dir: Path) -> StageOneConfig:
    path = Path(run_dir) / "config.json"
    data = read_config(run_dir)
    try:
        return CONFIGS[data["kind"]].from_dict(data["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid model configuration ({e})") from None


def read_model_config(path: str | Path) -> StageOneConfig:
    """A model configuration from a JSON file (the ``model`` part of a run's config.json): a
    ``VQVAE2Config`` when it lists ``strides``, else a ``VQVAEConfig``."""
    path = Path(path)
    data = _read_json(path, ConfigError, "no such config file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a model config is a JSON object of its fields")
    try:
        return CONFIGS["vqvae2" if "strides" in data else "vqvae"].from_dict(data)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: invalid model config ({e})") from None


# The last evaluation of a run (what ``vqkit eval --json`` prints, with its checkpoint's step and
# fingerprint), kept in the run folder for ``vqkit report`` and ``vqkit export``.
EVAL_FILE = "eval.json"


def save_eval(run: str | Path, record: dict) -> Path:
    """Write ``record`` to ``RUN/eval.json`` atomically, replacing the previous evaluation."""
    path = Path(run) / EVAL_FILE
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def read_eval(run: str | Path) -> dict | None:
    """``RUN/eval.json`` as ``save_eval`` wrote it, or None if there is none; an unreadable one is
    a ``CheckpointError`` naming the file."""
    path = Path(run) / EVAL_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); run vqkit eval {run} again") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: not an evaluation record; run vqkit eval {run} again")
    return record


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, metrics: dict | None = None, *, best: bool = False,
                    trained: torch.nn.Module | None = None) -> Path:
    """Write checkpoint ``step`` atomically, point ``latest`` (and with ``best``, ``best``) at
    it, prune old ones. With ``trained``, ``model`` holds the averaged weights of the module
    ``trained`` that the optimizer steps; those are saved for resuming."""
    root = Path(run_dir) / "checkpoints"
    name = f"step-{step:08d}"
    final = root / name
    pointer = Path(run_dir) / LATEST
    if final.exists() and pointer.exists() and pointer.read_text().strip() == name:
        raise CheckpointError(f"{final}: step {step} is already the latest checkpoint; "
                              "a saved checkpoint is never overwritten")
    tmp = root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    opt_tensors, opt_json = _flatten_optimizer(optimizer.state_dict())
    opt_tensors["rng.torch"] = torch.get_rng_state()
    if trained is not None:
        opt_tensors.update({TRAINED_PREFIX + k: v.detach().contiguous().cpu()
                            for k, v in trained.state_dict().items()})
    save_file(opt_tensors, str(tmp / "training.safetensors"))
    state = {"step": step, "fingerprint": fingerprint(tmp / "model.safetensors"),
             "training_fingerprint": fingerprint(tmp / "training.safetensors"),
             "optimizer": opt_json, "metrics": metrics or {}, "averaged": trained is not None}
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    for f in tmp.iterdir():
        fsync_file(f)
    fsync_dir(tmp)
    if final.exists():  # left by a crash after its rename, before ``latest`` named it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_text(pointer, name + "\n")
    if best:
        mark_best(run_dir, step)
    _prune(Path(run_dir))
    return final


def mark_best(run_dir: Path, step: int) -> None:
    """Point ``best`` at the saved checkpoint of ``step``."""
    name = f"step-{step:08d}"
    if not (Path(run_dir) / "checkpoints" / name / "state.json").exists():
        raise CheckpointError(f"{Path(run_dir) / 'checkpoints' / name}: no saved checkpoint to mark as best")
    atomic_write_text(Path(run_dir) / BEST, name + "\n")


def _prune(run_dir: Path) -> None:
    """Delete all but the newest ``KEEP_CHECKPOINTS`` checkpoints and the one ``best`` names."""
    keep = {_pointed(run_dir / p) for p in (LATEST, BEST)} - {None}
    older = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if p.name not in keep)
    for old in older[: max(0, len(older) - (KEEP_CHECKPOINTS - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def _pointed(pointer: Path) -> str | None:
    try:
        return pointer.read_text().strip()
    except FileNotFoundError:
        return None


def latest_checkpoint(run_dir: Path) -> Checkpoint:
    return read_checkpoint(run_dir, LATEST)


def read_checkpoint(run_dir: Path, which: str = LATEST) -> Checkpoint:
    """The checkpoint that ``run_dir/which`` (``latest`` or ``best``) names."""
    run_dir = Path(run_dir)
    pointer = run_dir / which
    if not pointer.exists():
        raise CheckpointError(f"{run_dir}: no {which} checkpoint ({pointer} is missing)"
                              if which != LATEST else f"{run_dir}: no checkpoint yet ({pointer} is missing)")
    name = pointer.read_text().strip()
    path = run_dir / "checkpoints" / name
    state_path = path / "state.json"
    try:
        state = json.loads(state_path.read_text())
        step = int(state["step"])
    except FileNotFoundError:
        raise CheckpointError(f"{state_path}: missing (checkpoint named in {pointer})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{state_path}: unreadable checkpoint state ({e})") from None
    return Checkpoint(path=path, step=step, state=state)


# What a prior run is used at by default: its best checkpoint by held-out NLL.
CHECKPOINT_CHOICES = (BEST, LATEST)


def chosen_checkpoint(run_dir: Path, which: str = BEST) -> Checkpoint:
    """The checkpoint ``which`` of a run: ``latest``, or ``best`` (the run's latest where it kept
    no best one: a run trained without held-out evaluation, or by an older vqkit)."""
    if which not in CHECKPOINT_CHOICES:
        raise UsageError(f"checkpoint must be one of {', '.join(CHECKPOINT_CHOICES)}, got {which!r}")
    if which == BEST and not (Path(run_dir) / BEST).exists():
        which = LATEST
    return read_checkpoint(run_dir, which)


def read_validation(run_dir: Path) -> dict | None:
    """``RUN/validation.json`` (``{"metric": name, "history": [[step, value], ...]}``) or None if
    the run has none; an unreadable one is a CheckpointError naming the file."""
    path = Path(run_dir) / VALIDATION_FILE
    if not path.exists():
        return None
    data = _read_json(path, CheckpointError, "missing")
    history = data.get("history") if isinstance(data, dict) else None
    if not isinstance(history, list) or not all(
            isinstance(h, list) and len(h) == 2 and isinstance(h[0], int) and isinstance(h[1], (int, float))
            for h in history):
        raise CheckpointError(f"{path}: not a validation record ({{'metric': ..., 'history': [[step, value], ...]}})")
    return data


def write_validation(run_dir: Path, metric: str, history: list[tuple[int, float]]) -> None:
    atomic_write_text(Path(run_dir) / VALIDATION_FILE, json.dumps(
        {"metric": metric, "history": [[int(s), float(v)] for s, v in history]}, indent=2) + "\n")


def _load_tensors(path: Path, expected_fingerprint: str | None) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: missing")
    if expected_fingerprint is not None and fingerprint(path) != expected_fingerprint:
        raise CheckpointError(f"{path}: contents do not match the fingerprint in state.json "
                              "(the file is corrupt or was replaced)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_model(run_dir: Path, device: str | torch.device = "cpu",
               kinds: tuple[str, ...] = VQ_KINDS) -> tuple[VQVAE, Checkpoint]:
    """Rebuild the stage-1 model from ``config.json`` and load the latest weights, in eval mode.

    ``kinds`` are the run kinds the caller can use: by default the VQ models, whose latents are
    codes; pass ``STAGE1_KINDS`` to take a Gaussian VAE run (a ``GaussianVAE``) too.
    """
    config = model_config_of(run_dir)
    if config.kind not in kinds:
        raise CheckpointError(f"{Path(run_dir) / 'config.json'}: this is a {config.kind!r} run (a Gaussian VAE, "
                              "whose latents are continuous, not codes); this needs a "
                              f"{' or '.join(repr(k) for k in kinds)} run")
    model = build_model(config)
    ckpt = load_latest_weights(run_dir, model)
    return model.to(device).eval(), ckpt


def load_prior(run_dir: str | Path, which: str = BEST) -> tuple[Prior, dict]:
    """The prior of a prior run at its checkpoint ``which`` (``best`` by held-out NLL, the
    default, or ``latest``; see ``chosen_checkpoint``), in eval mode, and its config.json."""
    prior, config, _ = load_prior_checkpoint(run_dir, which)
    return prior, config


def load_prior_checkpoint(run_dir: str | Path, which: str = BEST,
                          device: str | torch.device = "cpu") -> tuple[Prior, dict, Checkpoint]:
    """``load_prior`` (on ``device``), and the checkpoint it loaded (whose fingerprint names the weights)."""
    config = read_config(run_dir, kind="prior")
    try:
        prior_config = PriorConfig.from_dict(config["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(run_dir) / 'config.json'}: invalid prior configuration ({e})") from None
    prior = build_prior(prior_config)
    checkpoint = chosen_checkpoint(run_dir, which)
    load_weights_of(checkpoint, prior)
    return prior.to(device).eval(), config, checkpoint


def load_classifier(run_dir: str | Path) -> tuple[Classifier, dict]:
    """The latest classifier of a classifier run (vqkit train-classifier), in eval mode, and
    its config.json."""
    config = read_config(run_dir, kind="classifier")
    try:
        model = Classifier(ClassifierConfig.from_dict(config["model"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(run_dir) / 'config.json'}: invalid classifier configuration ({e})") from None
    load_latest_weights(run_dir, model)
    return model.eval(), config


def load_latest_weights(run_dir: Path, model: torch.nn.Module) -> Checkpoint:
    """Load the latest checkpoint's weights into ``model`` (built from the run's config)."""
    return load_weights_of(latest_checkpoint(run_dir), model)


def load_weights_of(ckpt: Checkpoint, model: torch.nn.Module) -> Checkpoint:
    """Load the weights of ``ckpt`` into ``model``, checked against its fingerprint."""
    weights_path = ckpt.path / "model.safetensors"
    _load_state(model, _load_tensors(weights_path, ckpt.state.get("fingerprint")), weights_path)
    return ckpt


def _load_state(model: torch.nn.Module, weights: dict, path: Path) -> None:
    problem = fit_state_dict(model, weights)
    if problem:
        raise CheckpointError(f"{path}: weights do not fit the model in config.json ({problem})")


def load_training_state(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        averaged: torch.nn.Module | None = None) -> Checkpoint:
    """Restore weights, optimizer state and RNG state of the latest checkpoint for resuming.

    A checkpoint of a run that averages its weights (``state["averaged"]``) gives ``model`` its
    trained weights and ``averaged`` (when given) the average; any other gives ``model`` its
    weights and leaves ``averaged`` as it is."""
    ckpt = latest_checkpoint(run_dir)
    weights_path = ckpt.path / "model.safetensors"
    weights = _load_tensors(weights_path, ckpt.state.get("fingerprint"))
    training_path = ckpt.path / "training.safetensors"
    tensors = _load_tensors(training_path, ckpt.state.get("training_fingerprint"))
    trained = {k[len(TRAINED_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(TRAINED_PREFIX)}
    if ckpt.state.get("averaged"):
        if not trained:
            raise CheckpointError(f"{training_path}: the checkpoint averages its weights but holds no "
                                  "trained weights to resume from")
        _load_state(model, trained, training_path)
        if averaged is not None:
            _load_state(averaged, weights, weights_path)
    else:
        _load_state(model, weights, weights_path)
    try:
        torch.set_rng_state(tensors.pop("rng.torch"))
        optimizer.load_state_dict(_unflatten_optimizer(tensors, ckpt.state["optimizer"]))
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{training_path}: optimizer state does not fit this model ({e})") from None
    return ckpt


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, slots in state_dict["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, slots in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(slots)
    # JSON turns tuples (Adam's betas) into lists; only "params" is a list in torch's groups.
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}
