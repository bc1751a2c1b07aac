"""Choosing a model's quantizer: the ``"quantizer"`` entry of a model config.

A quantizer spec is a JSON object with a ``kind`` and that kind's options::

    {"kind": "vq"}                                  the VectorQuantizer of vqkit.nn.quantize
    {"kind": "vq", "cosine": true, "factor_dim": 8, "rotation": true}
    {"kind": "fsq", "levels": [8, 5, 5, 5]}         FSQ, K = prod(levels) (vqkit.nn.scalar)
    {"kind": "lfq", "bits": 10}                     LFQ, K = 2**bits (vqkit.nn.scalar)
    {"kind": "residual", "stages": 2}               residual VQ, S stages of K codes (vqkit.nn.residual)
    {"kind": "residual", "stages": 4, "shared": true, "quantize_dropout": true, "cosine": true}

``canonical_spec`` checks a spec and drops the options left at their defaults (but for
``ALWAYS_WRITTEN``'s), so that two spellings of one quantizer compare (and fingerprint) equal.
The options that every model config holds at its top level (``beta``, ``ema``, ``decay``,
``kmeans_init``, ``restart_after``) go to the VQ kind and to every stage of a residual one, and
``beta`` (the commitment weight) to LFQ; FSQ has no loss and no state. ``parse_quantizer``
reads the command line's short form, ``vq:cosine,rotation,factor_dim=8``, ``fsq:8,5,5,5``,
``lfq:10``, ``lfq:bits=10,entropy_weight=0.2`` or ``residual:2,shared,quantize_dropout`` (or a
JSON object).

A residual level of S stages gives S code maps of one resolution (``spec_stages``), each of the
level's codebook size K: a model's code maps are its levels' maps top-first, a residual level's
stage 0 first (``vqkit.nn.vqvae``). ``quantize_dropout`` is off by default, as in the layer: on
CIFAR-10 (README) it cost the full model 0.55 dB for 0.48 dB more in stage 0's preview, which
greedy residual coding already makes a fair coarse image without it.
"""

from __future__ import annotations

import json
import math

from vqkit.errors import ConfigError
from vqkit.nn.quantize import Quantizer, VectorQuantizer
from vqkit.nn.residual import ResidualVQ
from vqkit.nn.scalar import FSQ, LFQ

_REQUIRED = object()

# Each kind's options and their defaults (_REQUIRED: no default).
OPTIONS: dict[str, dict[str, object]] = {
    "vq": {"cosine": False, "factor_dim": None, "rotation": False},
    "fsq": {"levels": _REQUIRED},
    # LFQ's temperature was 0.01 (vector-quantize-pytorch's), which collapses to 32 of 1,024 codes
    # on CIFAR-10 (README); at 1 every code is used.
    "lfq": {"bits": _REQUIRED, "entropy_weight": 0.1, "diversity": 1.0, "temperature": 1},
    # No rotation or factor_dim: the stages pass one straight-through gradient over their sum and
    # quantize residuals in z_e's own space (vqkit.nn.residual).
    "residual": {"stages": _REQUIRED, "shared": False, "quantize_dropout": False, "cosine": False},
}
# The most stages a residual level may have: a .vq file holds at most 8 code maps in all.
MAX_STAGES = 8
DEFAULT = {"kind": "vq"}
# Options a canonical spec always holds, even at their defaults. LFQ's temperature is one because
# its default changed: the specs saved with the old default left it out, the ones that asked for 1
# spelt it out, and writing it always keeps those (the good ones) hashing as they did when their
# .vq files were written, while a spec that omits it now means the new default.
ALWAYS_WRITTEN = {("lfq", "temperature")}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_option(kind: str, name: str, value, where: str) -> object:
    """The option's value, checked (a ``ConfigError`` naming ``where`` if it cannot be used)."""
    problem = None
    if name in ("cosine", "rotation", "shared", "quantize_dropout"):
        problem = None if isinstance(value, bool) else "must be true or false"
    elif name == "factor_dim":
        problem = None if value is None or (_is_int(value) and value >= 1) else "must be a positive integer"
    elif name == "levels":
        if isinstance(value, (list, tuple)) and value and all(_is_int(n) and n >= 2 for n in value):
            value = list(value)
        else:
            problem = "must be a non-empty list of integers >= 2, e.g. [8, 5, 5, 5]"
    elif name == "stages":
        problem = None if _is_int(value) and 1 <= value <= MAX_STAGES else f"must be an integer in 1..{MAX_STAGES}"
    elif name == "bits":
        problem = None if _is_int(value) and 1 <= value <= 30 else "must be an integer in 1..30"
    elif name in ("entropy_weight", "diversity"):
        problem = None if _is_number(value) and value >= 0 else "must be a number >= 0"
    elif name == "temperature":
        problem = None if _is_number(value) and value > 0 else "must be a number > 0"
    if problem:
        raise ConfigError(f"{where}: {kind} option {name!r} {problem}, got {value!r}")
    return value


def canonical_spec(spec, where: str = "quantizer") -> dict:
    """``spec`` checked, with ``kind`` first and the options at their defaults left out."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: a quantizer is an object such as {{\"kind\": \"fsq\", \"levels\": [8, 5, 5, 5]}}, "
                          f"got {spec!r}")
    kind = spec.get("kind")
    if kind not in OPTIONS:
        raise ConfigError(f"{where}: unknown quantizer kind {kind!r}; choose one of {', '.join(OPTIONS)}")
    options = OPTIONS[kind]
    unknown = sorted(set(spec) - set(options) - {"kind"})
    if unknown:
        raise ConfigError(f"{where}: unknown {kind} option(s) {', '.join(unknown)}; "
                          f"{kind} takes {', '.join(options) or 'none'}")
    out = {"kind": kind}
    for name, default in options.items():
        if name not in spec:
            if default is _REQUIRED:
                raise ConfigError(f"{where}: the {kind} quantizer needs {name!r}")
            if (kind, name) in ALWAYS_WRITTEN:
                out[name] = default
            continue
        value = _check_option(kind, name, spec[name], where)
        if value != default or default is _REQUIRED or (kind, name) in ALWAYS_WRITTEN:
            out[name] = value
    return out


def spec_codebook_size(spec: dict) -> int | None:
    """K as a (canonical) spec fixes it: FSQ's and LFQ's grids; None for VQ (any K)."""
    if spec["kind"] == "fsq":
        return math.prod(spec["levels"])
    if spec["kind"] == "lfq":
        return 2 ** spec["bits"]
    return None


def spec_stages(spec: dict) -> int:
    """The number of code maps a level of (canonical) ``spec`` gives: a residual level's stages, else 1."""
    return spec["stages"] if spec["kind"] == "residual" else 1


def build_quantizer(spec: dict, codebook_size: int, dim: int, *, beta: float = 0.25, ema: bool = False,
                    decay: float = 0.99, kmeans_init: bool = False,
                    restart_after: int = 0) -> Quantizer | ResidualVQ:
    """The quantizer of a (canonical) ``spec`` for ``dim`` channels and ``codebook_size`` codes,
    with a model config's shared options (those that apply to the kind)."""
    options = {**{k: v for k, v in OPTIONS[spec["kind"]].items() if v is not _REQUIRED},
               **{k: v for k, v in spec.items() if k != "kind"}}
    fixed = spec_codebook_size(spec)
    if fixed is not None and fixed != codebook_size:
        raise ConfigError(f"a {spec['kind']} quantizer {spec} has {fixed} codes, not {codebook_size}")
    if spec["kind"] == "fsq":
        return FSQ(options["levels"], dim)
    if spec["kind"] == "lfq":
        return LFQ(options["bits"], dim, beta=beta, entropy_weight=options["entropy_weight"],
                   diversity=options["diversity"], temperature=options["temperature"])
    if spec["kind"] == "residual":
        return ResidualVQ(options.pop("stages"), codebook_size, dim, options.pop("shared"),
                          options.pop("quantize_dropout"), beta=beta, ema=ema, decay=decay,
                          kmeans_init=kmeans_init, restart_after=restart_after, **options)
    return VectorQuantizer(codebook_size, dim, beta=beta, ema=ema, decay=decay, kmeans_init=kmeans_init,
                           restart_after=restart_after, **options)


def _value(text: str):
    """A command-line option value: JSON where it parses (numbers, true/false, lists), else text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_quantizer(text: str) -> dict:
    """A spec from the command line: a JSON object, or ``KIND[:ITEM,ITEM...]`` where an item is
    ``name=value`` or, by kind, a bare flag (vq: ``cosine``, ``rotation``; residual: ``cosine``,
    ``shared``), a level (fsq: ``8,5,5,5``), the number of bits (lfq: ``10``) or of stages
    (residual: ``2``). Returns it canonical."""
    where = f"--quantizer {text!r}"
    text = text.strip()
    if text.startswith("{"):
        try:
            return canonical_spec(json.loads(text), where)
        except ValueError as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{where}: not valid JSON ({e})") from None
    kind, _, rest = text.partition(":")
    if kind not in OPTIONS:
        canonical_spec({"kind": kind}, where)  # the error that names the kinds
    spec: dict = {"kind": kind}
    levels = []
    for item in filter(None, (part.strip() for part in rest.split(","))):
        name, eq, value = item.partition("=")
        if eq:
            spec[name.strip()] = _value(value.strip())
        elif kind == "vq" or (kind == "residual" and not item.isdigit()):
            spec[item] = True
        elif kind == "fsq" and item.isdigit():
            levels.append(int(item))
        elif kind == "lfq" and item.isdigit() and "bits" not in spec:
            spec["bits"] = int(item)
        elif kind == "residual" and item.isdigit() and "stages" not in spec:
            spec["stages"] = int(item)
        else:
            raise ConfigError(f"{where}: cannot read {item!r} (give name=value)")
    if levels:
        spec["levels"] = levels
    return canonical_spec(spec, where)
