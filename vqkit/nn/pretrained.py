"""Models saved and loaded the way the Hugging Face Hub shares them: one folder of

    config.json          the model configuration's fields, plus "model_type" ("vqvae",
                         "vqvae2", "prior": the kind of run that trains it) and "vqkit_version"
    model.safetensors    the state dict (weights and buffers: codebooks, EMA statistics)

and, when ``vqkit export`` writes it, a model card ``README.md``. Nothing else is needed to load
such a folder, wherever it came from: ``VQVAE.from_pretrained(folder)``. A string that is not
an existing path but looks like a Hub repo id (``"user/name"``) is downloaded first with
``huggingface_hub.snapshot_download`` (only config.json and model.safetensors), if that package
is installed; vqkit does not depend on it.

``save_pretrained`` writes both files into a temporary folder beside the target and renames it
into place (``vqkit.fsutil.atomic_folder``): a crash never leaves half a model. Nothing is
pickled: JSON and safetensors only. ``from_pretrained`` refuses, with a ``PretrainedError``
naming the file, anything it cannot rebuild exactly: a missing folder or file, invalid JSON, an
unknown model_type, configuration keys it does not know or values it does not accept, weights
that do not fit the configuration.

Why not ``huggingface_hub.ModelHubMixin`` / ``PyTorchModelHubMixin`` (checked with
huggingface_hub 2.4.0): it would replace almost none of this module and would weaken most of it.
Its dataclass decoding drops unknown config keys silently, and with postponed annotations (``from
__future__ import annotations``, used throughout vqkit) it does not recognise the config
dataclass at all and passes the raw dict to ``__init__``; it loads weights with ``strict=False``
by default (missing and unexpected tensors ignored); on the Hub it falls back to
``pytorch_model.bin`` through ``torch.load`` (pickle, if weights-only); ``save_pretrained``
writes straight into the target folder, so a crash leaves a half-written model; it has no
model_type dispatch (``from_pretrained`` builds the class it is called on); it overrides
``__new__`` and ``__init_subclass__`` of every model class and prints to stdout while loading.
Overriding all of that leaves only ``snapshot_download``, which is what is used here, optionally.
The folders are the same either way: ``huggingface_hub`` can upload and download them as they are.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vqkit import __version__
from vqkit.errors import VqkitError
from vqkit.fsutil import atomic_folder

if TYPE_CHECKING:
    from vqkit.config import JsonConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
# What a saved model folder holds; an existing folder is only ever replaced if it holds nothing else.
FOLDER_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
# Keys of config.json that are not fields of the model configuration.
MODEL_TYPE_KEY = "model_type"
VERSION_KEY = "vqkit_version"
# The modules that define the model classes of this layer, imported before dispatching on
# model_type. Priors live in a higher layer, which this one never imports: their classes are
# known once ``vqkit.prior`` has been imported (``Prior.from_pretrained`` always has).
MODEL_MODULES = ("vqkit.nn.vqvae", "vqkit.nn.classifier")
_ELSEWHERE = {"prior": "vqkit.prior"}
# A Hugging Face Hub repo id, "owner/name".
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")

T = TypeVar("T", bound="PretrainedMixin")


class PretrainedError(VqkitError, ValueError):
    """A saved model folder that cannot be written or rebuilt; the message names the file."""


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for a ``torch.nn.Module`` built from one
    ``JsonConfig`` dataclass held in ``self.config``.

    A model class declares ``model_type`` (the name written to config.json) and
    ``config_class``; a class whose configuration decides which subclass to build (``Prior``:
    its ``arch``) overrides ``from_config``.
    """

    model_type: ClassVar[str]
    config_class: ClassVar[type[JsonConfig]]
    config: Any

    @classmethod
    def from_config(cls: type[T], config) -> T:
        """A freshly initialised model for ``config``."""
        return cls(config)  # type: ignore[call-arg]

    def pretrained_config(self) -> dict:
        """The contents of config.json: model_type, the vqkit version, the config's fields."""
        return {MODEL_TYPE_KEY: _model_type_of(self), VERSION_KEY: __version__, **self.config.to_dict()}

    def save_pretrained(self, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write config.json and model.safetensors into ``folder``, atomically, and return it.

        ``folder`` must be new or empty, unless ``overwrite``: then a folder holding a saved
        model (nothing but config.json, model.safetensors, README.md) is replaced whole.
        """
        folder = Path(folder)
        check_target(folder, overwrite)
        weights = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}  # type: ignore[attr-defined]
        with atomic_folder(folder, replace=overwrite) as tmp:
            (tmp / CONFIG_NAME).write_text(config_text(self))
            save_file(weights, str(tmp / WEIGHTS_NAME))
        return folder

    @classmethod
    def from_pretrained(cls: type[T], name_or_path: str | os.PathLike, *,
                        device: str | torch.device = "cpu", revision: str | None = None) -> T:
        """The model saved in a folder (or a Hub repo id), on ``device``, in eval mode.

        Called on a base class (``PretrainedMixin``, ``Prior``) it returns the subclass that
        config.json's model_type (and, for priors, arch) names. ``revision`` (a branch, tag or
        commit) applies to Hub repo ids only.
        """
        folder = resolve(name_or_path, revision)
        config_path = folder / CONFIG_NAME
        data = read_json(config_path)
        model_type = data.pop(MODEL_TYPE_KEY, None)
        version = data.pop(VERSION_KEY, None)
        written = f"; written by vqkit {version}, this is vqkit {__version__}" if version else ""
        if not isinstance(model_type, str):
            raise PretrainedError(f"{config_path}: no {MODEL_TYPE_KEY!r} key; not a saved vqkit model")
        klass = _class_for(cls, model_type, config_path, written)
        try:
            config = klass.config_class.from_dict(data)
        except (TypeError, ValueError) as e:
            raise PretrainedError(f"{config_path}: invalid {klass.config_class.label} ({e}{written})") from None
        model = klass.from_config(config)
        if not isinstance(model, cls):  # a prior of another arch than the subclass called on
            raise PretrainedError(f"{config_path}: holds a {type(model).__name__}, not a {cls.__name__}; "
                                  f"load it with {_known_types()[model_type].__name__}.from_pretrained")
        load_weights(model, folder / WEIGHTS_NAME)
        return model.to(device).eval()  # type: ignore[attr-defined]


def config_text(model: PretrainedMixin) -> str:
    return json.dumps(model.pretrained_config(), indent=2) + "\n"


def check_target(folder: Path, overwrite: bool) -> None:
    """Refuse to write a saved model over anything but a new or empty folder or, with
    ``overwrite``, a folder that holds a saved model and nothing else."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise PretrainedError(f"{folder}: exists and is not a folder")
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return
    if not overwrite:
        raise PretrainedError(f"{folder}: exists and is not empty; choose a new folder or replace it "
                              "(overwrite=True, vqkit export --overwrite)")
    foreign = [name for name in entries if name not in FOLDER_FILES]
    if foreign:
        raise PretrainedError(f"{folder}: holds {', '.join(foreign[:5])}, which {'is' if len(foreign) == 1 else 'are'} "
                              "not part of a saved model; refusing to replace it (choose a new or empty folder)")


def resolve(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of ``name_or_path``: an existing path as it is; a string that looks
    like a Hub repo id ("owner/name") downloaded with huggingface_hub.snapshot_download."""
    path = Path(name_or_path)
    if path.exists():
        if revision is not None:
            raise PretrainedError(f"{path}: a local folder has no revision (revision={revision!r} "
                                  "applies to Hub repo ids only)")
        if not path.is_dir():
            raise PretrainedError(f"{path}: not a folder (a saved model is a folder holding "
                                  f"{CONFIG_NAME} and {WEIGHTS_NAME})")
        return path
    if not isinstance(name_or_path, str) or not _REPO_ID.fullmatch(name_or_path) or ".." in name_or_path:
        raise PretrainedError(f"{path}: no such folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PretrainedError(f"{name_or_path}: no such folder; to download it from the Hugging Face Hub "
                              "as a repo id, install huggingface_hub (pip install huggingface_hub)") from None
    try:
        local = snapshot_download(repo_id=name_or_path, revision=revision,
                                  allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
    except (OSError, ValueError) as e:  # huggingface_hub's HTTP errors are OSErrors
        raise PretrainedError(f"{name_or_path}: no such folder, and it could not be downloaded from the "
                              f"Hugging Face Hub ({type(e).__name__}: {e})") from e
    return Path(local)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PretrainedError(f"{path}: missing; {path.parent} is not a saved vqkit model (save_pretrained "
                              f"and vqkit export write {CONFIG_NAME} and {WEIGHTS_NAME})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PretrainedError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise PretrainedError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise PretrainedError(f"{path}: not a model configuration (a JSON object)")
    return data


def fit_state_dict(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> str | None:
    """Load ``weights`` into ``model`` through ``load_state_dict``, so that the model's own load
    hooks (such as a renaming of older key names) apply; returns what does not fit (missing or
    unexpected keys, shape mismatches), or None when everything did."""
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        wrong = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        return "; ".join(wrong[:5]) or str(e)
    parts = []
    if result.missing_keys:
        parts.append(f"missing {', '.join(sorted(result.missing_keys)[:5])}")
    if result.unexpected_keys:
        parts.append(f"unexpected {', '.join(sorted(result.unexpected_keys)[:5])}")
    return "; ".join(parts) or None


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load the safetensors file ``path`` into ``model``, which it must fit exactly
    (``fit_state_dict``)."""
    if not path.is_file():
        raise PretrainedError(f"{path}: missing")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise PretrainedError(f"{path}: not a readable safetensors file ({e})") from None
    problem = fit_state_dict(model, weights)
    if problem:
        raise PretrainedError(f"{path}: weights do not fit the model in {CONFIG_NAME} ({problem})")


def _subclasses(root: type) -> list[type]:
    """``root`` and all its subclasses, breadth-first (the more general first)."""
    order: list[type] = []
    queue = [root]
    while queue:
        klass = queue.pop(0)
        if klass not in order:
            order.append(klass)
            queue.extend(klass.__subclasses__())
    return order


def _known_types() -> dict[str, type]:
    """Every model_type of the classes imported so far, with the most general class of each."""
    known: dict[str, type] = {}
    for klass in _subclasses(PretrainedMixin):
        model_type = getattr(klass, "model_type", None)
        if model_type is not None:
            known.setdefault(model_type, klass)
    return known


def _model_type_of(model: PretrainedMixin) -> str:
    """The model_type to save ``model`` as: that of the class whose config_class its config is
    (its own class's, unless it holds the configuration of another, e.g. a base class built
    from a subclass's config)."""
    own = type(model)
    if type(model.config) is own.config_class:
        return own.model_type
    for model_type, klass in _known_types().items():
        if type(model.config) is klass.config_class:
            return model_type
    raise PretrainedError(f"a {own.__name__} holding a {type(model.config).__name__} has no model_type "
                          "to be saved as")


def _class_for(cls: type[T], model_type: str, path: Path, written: str) -> type[T]:
    """The most general class at or below ``cls`` whose model_type is ``model_type``."""
    for module in MODEL_MODULES:
        importlib.import_module(module)
    for klass in _subclasses(cls):
        if getattr(klass, "model_type", None) == model_type:
            return klass
    known = _known_types()
    if model_type in known:
        other = known[model_type].__name__
        raise PretrainedError(f"{path}: holds a {model_type!r} model ({other}), not a {cls.__name__}; "
                              f"load it with {other}.from_pretrained")
    if model_type in _ELSEWHERE:
        raise PretrainedError(f"{path}: holds a {model_type!r} model; import {_ELSEWHERE[model_type]} "
                              f"and load it with its class (e.g. vqkit.prior.Prior.from_pretrained)")
    raise PretrainedError(f"{path}: unknown model_type {model_type!r} (known: {', '.join(sorted(known))}"
                          f"{written})")
