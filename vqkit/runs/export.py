"""``vqkit export``: a run folder's latest checkpoint as a shareable model folder.

The folder is the layout of ``vqkit.nn.pretrained`` (config.json, model.safetensors) plus a
model card, README.md, with YAML front matter in the Hugging Face Hub's model-card convention
(``library_name``, ``tags``, ``datasets`` where the training set is a known Hub dataset) and a
body saying what the model was trained on, its architecture, its evaluation figures (from
``RUN/eval.json``, written by ``vqkit eval``) and how to load it. The folder can be uploaded to
the Hub as it is (``hf upload OWNER/NAME DIR``, with huggingface_hub installed).

The weights file is the checkpoint's own, copied byte for byte once its sha256 matches the one
recorded in state.json, so the exported model has the fingerprint that code sets and ``.vq``
files made with the run name. No ``pipeline_tag`` is written: no Hub pipeline is an image
tokenizer (image -> discrete codes -> image) or a prior over codes, and the nearest
(image-to-image, unconditional-image-generation) would promise a widget that does not work.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from vqkit.data.datasets import DataError, load_dataset
from vqkit.fsutil import atomic_folder
from vqkit.nn.pretrained import (
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    PretrainedMixin,
    check_target,
    config_text,
)
from vqkit.prior import PriorConfig, build_prior
from vqkit.runs import checkpoint as ckpt

# model_type -> (module, class) of the loading snippet in the card; the one place to change
# when the model classes move.
USAGE_IMPORTS = {
    "vqvae": ("vqkit", "VQVAE"),
    "vqvae2": ("vqkit", "VQVAE2"),
    "prior": ("vqkit", "Prior"),
    "vae": ("vqkit", "GaussianVAE"),
}
# Where the ``sample`` function of the prior snippet lives.
SAMPLE_IMPORT = ("vqkit", "sample")
# Dataset kinds (the KIND of a KIND:DIR spec) that are known Hub datasets, and their Hub ids.
HUB_DATASETS = {"mnist": "ylecun/mnist", "fashion-mnist": "zalando-datasets/fashion_mnist",
                "fashion": "zalando-datasets/fashion_mnist", "cifar10": "uoft-cs/cifar10"}
# Image side of the kinds whose images all have one size.
FIXED_SIDES = {"mnist": 28, "fashion-mnist": 28, "fashion": 28, "cifar10": 32}
MODEL_NAMES = {"vqvae": "VQ-VAE", "vqvae2": "VQ-VAE-2"}
ARCH_NAMES = {"pixelcnn": "Gated PixelCNN", "pixelsnail": "PixelSNAIL"}
LIKELIHOOD_NAMES = {"gaussian": "Gaussian", "logistic_mixture": "discretized logistic mixture",
                    "pixelcnn": "autoregressive (gated PixelCNN over the pixels)"}
_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_./-]*")


def export_run(run: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write RUN's latest checkpoint to ``out`` as config.json, model.safetensors and README.md.

    ``out`` must be new or empty unless ``overwrite`` (then a folder holding only those files is
    replaced). The folder is written beside ``out`` and renamed into place: a crash leaves no
    half-exported model. Returns ``out``.
    """
    run, out = Path(run), Path(out)
    check_target(out, overwrite)
    if ckpt.run_kind(run) == "prior":
        config = ckpt.read_config(run, kind="prior")
        try:
            model = build_prior(PriorConfig.from_dict(config["model"]))
        except (TypeError, ValueError) as e:
            raise ckpt.CheckpointError(f"{run / 'config.json'}: invalid prior configuration ({e})") from None
        checkpoint = ckpt.load_latest_weights(run, model)
    else:
        config = ckpt.read_config(run)
        model, checkpoint = ckpt.load_model(run, kinds=ckpt.STAGE1_KINDS)
    weights = checkpoint.path / "model.safetensors"
    expected = checkpoint.state.get("fingerprint") or ckpt.fingerprint(weights)
    card = model_card(run, out, model, config, checkpoint, ckpt.read_eval(run))
    with atomic_folder(out, replace=overwrite) as tmp:
        (tmp / CONFIG_NAME).write_text(config_text(model))
        shutil.copyfile(weights, tmp / WEIGHTS_NAME)
        if ckpt.fingerprint(tmp / WEIGHTS_NAME) != expected:
            raise ckpt.CheckpointError(f"{weights}: changed while it was exported (its sha256 no longer "
                                       "matches state.json); export again")
        (tmp / CARD_NAME).write_text(card)
    return out


# --------------------------------------------------------------------------------------------
# The model card


def model_card(run: Path, out: Path, model: PretrainedMixin, config: dict, checkpoint: ckpt.Checkpoint,
               record: dict | None) -> str:
    """README.md for the exported folder ``out`` of ``run``."""
    kind = model.model_type
    train = config.get("train", {})
    fingerprint = checkpoint.state.get("fingerprint") or "?"
    if kind == "prior":
        source = config.get("source") or {}
        tags = ["vq-vae", "prior", "autoregressive", model.config.arch]
        if source.get("level") and source.get("level") != "codes":
            tags.insert(1, "vq-vae-2")
        spec = source.get("data")
    elif kind == "vae":
        tags = ["vae", "gaussian-vae"]
        spec = train.get("data")
    else:
        tags = ["vq-vae", *(["vq-vae-2"] if kind == "vqvae2" else []), "image-tokenizer"]
        spec = train.get("data")
    meta = {"library_name": "vqkit", "tags": tags}
    dataset = HUB_DATASETS.get(_data_kind(spec))
    if dataset:
        meta["datasets"] = [dataset]
    if kind == "prior":
        body = _prior_body(run, out, model, config, checkpoint, record)
    elif kind == "vae":
        body = _vae_body(run, out, model, config, checkpoint, record)
    else:
        body = _stage1_body(run, out, model, config, checkpoint, record)
    files = (f"## Files\n\n- `{CONFIG_NAME}`: the model configuration, with `model_type` \"{kind}\"\n"
             f"- `{WEIGHTS_NAME}`: the weights, sha256 `{fingerprint}`: the fingerprint by which vqkit "
             "matches code sets, priors and `.vq` files to the model that made them\n"
             f"- `{CARD_NAME}`: this card, written by `vqkit export`\n")
    return f"---\n{_yaml(meta)}---\n\n{body}\n{files}"


def _yaml(meta: dict) -> str:
    """Front matter: a mapping of strings and lists of strings. A string that is not a plain
    YAML word is written JSON-quoted, which YAML reads as the same string."""
    def scalar(value: str) -> str:
        return value if _PLAIN.fullmatch(value) else json.dumps(value)

    lines = []
    for key, value in meta.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {scalar(item)}" for item in value)
        else:
            lines.append(f"{key}: {scalar(value)}")
    return "\n".join(lines) + "\n"


def _data_kind(spec: str | None) -> str:
    return (spec or "").partition(":")[0].lower()


def _image_shape(train: dict, in_channels: int) -> tuple[int, int, int] | None:
    """(C, H, W) of the training images, if known without reading them (or by opening the set)."""
    side = train.get("image_size") or FIXED_SIDES.get(_data_kind(train.get("data")))
    if side:
        return in_channels, side, side
    try:
        data = load_dataset(train["data"], "train", image_size=train.get("image_size"))
    except (DataError, KeyError, OSError):
        return None
    return data.channels, data.height, data.width


def _schedule_rows(checkpoint: ckpt.Checkpoint, train: dict) -> list[list[str]]:
    """The training table's rows every run kind has: steps, batch size, learning rate, seed."""
    planned = train.get("steps")
    steps = str(checkpoint.step) + (f" (of {planned} planned)" if planned not in (None, checkpoint.step) else "")
    return [["steps", steps], ["batch size", str(train.get("batch_size", "?"))],
            ["learning rate", str(train.get("lr", "?"))], ["seed", str(train.get("seed", "?"))]]


def _eval_provenance(run: Path, checkpoint: ckpt.Checkpoint, record: dict) -> str:
    at = f"checkpoint step {record.get('step', '?')}, weights sha256 `{str(record.get('fingerprint'))[:12]}…`"
    where = f"on `{record.get('data', '?')}` ({record.get('split', '?')} split)"
    if record.get("fingerprint") == checkpoint.state.get("fingerprint"):
        return f"Measured by `vqkit eval` {where} for the exported weights ({at})."
    return (f"**These figures are of another checkpoint** ({at}), not of the exported weights (step "
            f"{checkpoint.step}, sha256 `{str(checkpoint.state.get('fingerprint'))[:12]}…`): run "
            f"`vqkit eval {run}` and export again to replace them. Measured by `vqkit eval` {where}.")


def _no_eval(run: Path) -> str:
    return (f"No evaluation yet: run `vqkit eval {run}` (it keeps its figures in `{run / ckpt.EVAL_FILE}`) "
            "and export again to put them here.\n")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _stage1_body(run: Path, out: Path, model, config: dict, checkpoint: ckpt.Checkpoint,
                 record: dict | None) -> str:
    c = model.config
    train = config.get("train", {})
    name = MODEL_NAMES[model.model_type]
    code_maps = c.code_maps()
    levels = len(code_maps)  # code maps: levels, or a residual level's stages
    names = [m.name for m in code_maps]
    shape = _image_shape(train, c.in_channels)
    maps = None
    if shape is not None:
        try:
            maps = c.map_shapes(shape[1], shape[2])
        except ValueError:
            maps = None
    strides = [m.stride for m in code_maps]
    size = f"{shape[1]}x{shape[2]}" if shape else "unknown"
    residual = levels > c.num_levels
    what = f"{c.num_levels} level{'s' if c.num_levels > 1 else ''}, {levels} code maps" if residual \
        else f"{levels} levels"
    text = [f"# {name}{f' ({what})' if levels > 1 else ''} image tokenizer, trained with vqkit\n",
            f"A {name} (vector-quantized autoencoder) that turns {size} images with {c.in_channels} "
            f"channel{'s' if c.in_channels > 1 else ''} into {'maps' if levels > 1 else 'a map'} of discrete "
            f"codes{' (top-first)' if levels > 1 else ''} and decodes them back. Exported by `vqkit export` "
            f"from the run `{run.name}`, checkpoint step {checkpoint.step}.\n",
            "## Training\n",
            _table(["training", ""], [["data", f"`{train.get('data', '?')}`"],
                              ["image size", f"{size}, {c.in_channels} channel{'s' if c.in_channels > 1 else ''}"],
                              *_schedule_rows(checkpoint, train)]),
            "## Architecture\n",
            f"Levels top-first{f', for {size} images' if maps else ''}; the reduction factor is the number "
            "of image values (channels x height x width) per code."
            + (" A residual level's stages (`NAME.0`, `NAME.1`, ...) are one code map each, of its resolution, "
               "quantizing what the stages before them left." if residual else "") + "\n"]
    rows = []
    for level in range(levels):
        k = code_maps[level].codebook_size
        if maps:
            h, w = maps[level]
            reduction = shape[0] * shape[1] * shape[2] / (h * w)
            rows.append([names[level], f"{h}x{w}", str(k), f"{reduction:g}x"])
        else:
            rows.append([names[level], f"image / {strides[level]} per side", str(k),
                         f"{c.in_channels * strides[level] ** 2}x"])
    text.append(_table(["level", "code map", "codebook size", "reduction"], rows))
    text.append(f"Code dimension {c.code_dim}, {c.hidden} hidden channels, {c.num_res_blocks} residual "
                f"block{'s' if c.num_res_blocks != 1 else ''} per stack, "
                f"{LIKELIHOOD_NAMES.get(c.likelihood, c.likelihood)} "
                f"likelihood, {'EMA' if c.ema else 'gradient-trained'} codebook{'s' if levels > 1 else ''}. "
                + (f"Quantizer: `{json.dumps(c.quantizer)}` "
                   f"({'per level, top-first' if isinstance(c.quantizer, list) else 'every level'}). "
                   if c.quantizer is not None else "")
                + f"Everything needed to rebuild it is in `{CONFIG_NAME}`.\n")
    text.append("## Evaluation\n")
    if record is None:
        text.append(_no_eval(run))
    else:
        text.append(_eval_provenance(run, checkpoint, record) + f" {record.get('images', '?')} images.\n")
        text.append(_table(["PSNR", "MSE", "bits/dim", "codebook usage", "perplexity"], [[
            _num(record.get("psnr"), ".2f", " dB"), _num(record.get("mse"), ".5f"),
            _num(record.get("bits_per_dim"), ".3f"),
            f"{record.get('codes_used', '?')}/{record.get('codebook_size', '?')} ({_num(record.get('usage'), '.1%')})",
            _num(record.get("perplexity"), ".1f")]]))
        per_level = record.get("levels") or []
        if len(per_level) > 1:
            text.append("Per level, top-first (PSNR from a level and those above it alone, and with the "
                        "level zeroed and all others kept):\n")
            text.append(_table(["level", "code map", "codes used", "perplexity", "PSNR with the levels above",
                                "PSNR without this level"], [[
                str(lv.get("name", "?")), "x".join(str(v) for v in lv.get("shape", [])),
                f"{lv.get('codes_used', '?')}/{lv.get('codebook_size', '?')} ({_num(lv.get('usage'), '.1%')})",
                _num(lv.get("perplexity"), ".1f"), _num(lv.get("psnr_upto"), ".2f", " dB"),
                _num(lv.get("psnr_without"), ".2f", " dB")] for lv in per_level]))
    module, klass = USAGE_IMPORTS[model.model_type]
    h, w = shape[1:] if shape else (8 * strides[0],) * 2
    batch = 4
    code_shapes = ", ".join(f"({batch}, {a}, {b})" for a, b in c.map_shapes(h, w))
    text.append("## Usage\n\nWith vqkit installed:\n\n```python\n"
                "import torch\n"
                f"from {module} import {klass}\n\n"
                f"model = {klass}.from_pretrained({json.dumps(out.name)})  # this folder, or its Hub repo id "
                "\"owner/name\"\n"
                f"images = torch.rand({batch}, {c.in_channels}, {h}, {w}) * 2 - 1  # a batch (B, C, H, W) "
                "scaled to [-1, 1]\n"
                f"codes = model.encode(images)  # one map per {'code map' if residual else 'level'}, top-first: "
                f"[{code_shapes}] int64\n"
                f"decoded = model.decode(codes)  # ({batch}, {c.in_channels}, {h}, {w}) in [-1, 1]\n"
                "```\n\n"
                "`vqkit.data.images.load_image` reads image files and `vqkit.data.datasets.to_model` scales "
                "them to [-1, 1].\n")
    return "\n".join(text)


def _vae_body(run: Path, out: Path, model, config: dict, checkpoint: ckpt.Checkpoint,
              record: dict | None) -> str:
    c = model.config
    train = config.get("train", {})
    _, h, w = config.get("image_shape") or _image_shape(train, c.in_channels) or (c.in_channels, 32, 32)
    lh, lw = c.latent_shape(h, w)
    text = ["# Gaussian VAE, trained with vqkit\n",
            f"A VAE with a diagonal Gaussian posterior over a {lh}x{lw}x{c.code_dim} latent map and a standard "
            f"normal prior, for {h}x{w} images with {c.in_channels} channel{'s' if c.in_channels > 1 else ''}: "
            "the baseline beside which vqkit's VQ-VAEs are compared (`vqkit collapse`). Exported by "
            f"`vqkit export` from the run `{run.name}`, checkpoint step {checkpoint.step}.\n",
            "## Training\n",
            _table(["training", ""], [["data", f"`{train.get('data', '?')}`"], *_schedule_rows(checkpoint, train)]),
            f"{c.hidden} hidden channels, {c.num_res_blocks} residual block{'s' if c.num_res_blocks != 1 else ''} "
            f"per stack, {LIKELIHOOD_NAMES.get(c.likelihood, c.likelihood)} likelihood; trained on the negative "
            f"ELBO. Everything needed to rebuild it is in `{CONFIG_NAME}`.\n",
            "## Evaluation\n"]
    if record is None:
        text.append(_no_eval(run))
    else:
        text.append(_eval_provenance(run, checkpoint, record) + f" {record.get('images', '?')} images.\n")
        text.append(_table(["bits/dim (ELBO)", "KL per latent", "active units", "PSNR"], [[
            _num(record.get("bits_per_dim"), ".3f"), _num(record.get("kl_per_latent"), ".4f", " nats"),
            f"{record.get('active_units', '?')}/{record.get('latents', '?')}",
            _num(record.get("psnr"), ".2f", " dB")]]))
    module, klass = USAGE_IMPORTS["vae"]
    text.append("## Usage\n\nWith vqkit installed:\n\n```python\n"
                "import torch\n"
                f"from {module} import {klass}\n\n"
                f"model = {klass}.from_pretrained({json.dumps(out.name)})\n"
                f"samples = model.sample(4, {h}, {w})  # (4, {c.in_channels}, {h}, {w}) in [-1, 1], z ~ N(0, I)\n"
                f"z = model.encode(samples)  # posterior means (4, {c.code_dim}, {lh}, {lw})\n"
                "```\n")
    return "\n".join(text)


def _prior_body(run: Path, out: Path, model, config: dict, checkpoint: ckpt.Checkpoint,
                record: dict | None) -> str:
    c = model.config
    train = config.get("train", {})
    source = config.get("source") or {}
    level = source.get("level")
    of = f"the {level} level of " if level and level != "codes" else ""
    stage1 = str(source.get("fingerprint") or "?")
    cond_levels = source.get("cond_levels") or []
    arch = ARCH_NAMES.get(c.arch, c.arch)
    given = []
    if cond_levels:
        given.append(f"conditioned on the {' and '.join(cond_levels)} level{'s' if len(cond_levels) > 1 else ''}")
    if c.num_classes:
        given.append(f"class-conditional ({c.num_classes} classes)")
    given_text = f" ({', '.join(given)})" if given else ""
    attention = (f", causal self-attention every {c.attention_every} blocks with {c.attention_heads} heads"
                 if c.arch == "pixelsnail" else "")
    stacks = ", ".join(f"{h}x{w} (K = {k})" for k, h, w in c.cond_codes)
    conditioning = (f"; conditioning stacks of {c.cond_layers} blocks for the code maps {stacks}"
                    if c.cond_codes else "")
    text = [f"# {arch} prior over VQ-VAE codes, trained with vqkit\n",
            f"An autoregressive prior over {c.height}x{c.width} maps of codes in [0, {c.codebook_size}): "
            f"{of}the stage-1 model whose weights have sha256 `{stage1[:12]}…`{given_text}. Sample it and "
            "decode the codes with that model to generate images, or use it to entropy-code the model's "
            f"codes. Exported by `vqkit export` from the run `{run.name}`, checkpoint step {checkpoint.step}.\n",
            "## Training\n",
            _table(["training", ""], [["codes", f"`{source.get('data', '?')}` ({source.get('split', '?')} split), "
                                        f"encoded by the stage-1 model at step {source.get('step', '?')}"],
                              ["stage-1 weights", f"sha256 `{stage1}`"],
                              *_schedule_rows(checkpoint, train)]),
            "## Architecture\n",
            f"{arch}, {c.layers} layers of {c.channels} channels, kernel {c.kernel_size}{attention}"
            f"{conditioning}. Everything needed to rebuild it is in `{CONFIG_NAME}`.\n",
            "## Evaluation\n"]
    if record is None:
        text.append(_no_eval(run))
    else:
        text.append(_eval_provenance(run, checkpoint, record) + f" {record.get('maps', '?')} held-out maps.\n")
        stage = record.get("stage1") or {}
        text.append(_table(["bits per code", "uniform prior", "saved", "bits/dim with this prior",
                            "bits/dim with the uniform prior"], [[
            _num(record.get("bits_per_code"), ".3f"), _num(record.get("uniform_bits_per_code"), ".3f"),
            _num(record.get("saving_bits_per_code"), ".3f"), _num(record.get("bits_per_dim_with_prior"), ".3f"),
            _num(stage.get("bits_per_dim"), ".3f")]]))
    module, klass = USAGE_IMPORTS["prior"]
    n = 16
    args = [f"{n}"]
    setup = []
    if c.num_classes:
        setup.append(f"labels = torch.arange({n}) % {c.num_classes}  # a class per map")
        args.append("labels=labels")
    if c.cond_channels:
        setup.append(f"cond = torch.zeros({n}, {c.cond_channels}, {c.height}, {c.width})  # the conditioning map")
        args.append("cond=cond")
    if c.cond_codes:
        setup.append("# The maps of the levels above, top-first; stand-ins here: sample them from their priors.")
        setup.append("above = [" + ", ".join(f"torch.randint({k}, ({n}, {h}, {w}))" for k, h, w in c.cond_codes) + "]")
        args.append("cond_codes=above")
    sample_module, sample_name = SAMPLE_IMPORT
    imports = f"from {module} import {klass}, {sample_name}\n" if sample_module == module else \
        f"from {module} import {klass}\nfrom {sample_module} import {sample_name}\n"
    text.append("## Usage\n\nWith vqkit installed:\n\n```python\n"
                "import torch\n"
                f"{imports}\n"
                f"prior = {klass}.from_pretrained({json.dumps(out.name)})  # this folder, or its Hub repo id "
                "\"owner/name\"\n"
                + "".join(line + "\n" for line in setup) +
                f"codes = {sample_name}(prior, {', '.join(args)})  # ({n}, {c.height}, {c.width}) int64\n"
                "```\n\n"
                f"Decode the codes with the stage-1 model (`vqkit export` its run; sha256 `{stage1[:12]}…`)"
                f"{', together with the maps of the other levels, top-first' if level and level != 'codes' else ''}.\n")
    return "\n".join(text)


def _num(value, fmt: str, unit: str = "") -> str:
    return "?" if not isinstance(value, (int, float)) else f"{value:{fmt}}{unit}"
