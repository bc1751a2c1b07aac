"""save_pretrained / from_pretrained (vqkit.nn.pretrained): exact round trips in the Hub layout,
dispatch on model_type, a clear PretrainedError naming the file for every unusable folder, crash
safety, no pickle, and Hub repo ids through a stand-in snapshot_download."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import TINY2

from vqkit import __version__
from vqkit.nn import pretrained
from vqkit.nn.pretrained import PretrainedError, PretrainedMixin
from vqkit.nn.vqvae import VQVAE, VQVAE2, VQVAE2Config, VQVAEConfig
from vqkit.runs import checkpoint as ckpt

TINY1 = VQVAEConfig(in_channels=1, hidden=8, res_hidden=4, num_res_blocks=1, downsample=2, code_dim=4,
                    codebook_size=12, restart_after=2)


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g) * 2 - 1


def _model(config, seed: int = 0):
    """A model whose buffers are not their initial values: two forward passes in training mode
    k-means initialise the codebooks and move their EMA statistics."""
    torch.manual_seed(seed)
    model = (VQVAE2 if isinstance(config, VQVAE2Config) else VQVAE)(config)
    model.train()
    for step in range(2):
        model(_images(8, seed=100 + step))
    return model


def _levels(codes) -> list[torch.Tensor]:
    return codes if isinstance(codes, list) else [codes]


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved one-level and a saved two-level model, with the models themselves."""
    root = tmp_path_factory.mktemp("pretrained")
    out = {}
    for name, config in (("one", TINY1), ("two", TINY2)):
        model = _model(config)
        assert model.save_pretrained(root / name) == root / name
        out[name] = (model, root / name)
    return out


# --------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("name, cls", [("one", VQVAE), ("two", VQVAE2)])
def test_round_trip_is_exact_and_in_the_hub_layout(saved, name, cls):
    model, folder = saved[name]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config == {"model_type": cls.model_type, "vqkit_version": __version__, **model.config.to_dict()}

    for loader in (cls, PretrainedMixin):  # the class itself, and the base that dispatches on model_type
        loaded = loader.from_pretrained(folder)
        assert type(loaded) is cls and not loaded.training
        assert loaded.config == model.config
        _same_state(model, loaded)
        model.eval()
        x = _images(seed=7)
        codes, again = model.encode(x), loaded.encode(x)
        assert all(torch.equal(a, b) for a, b in zip(_levels(codes), _levels(again), strict=True))
        assert torch.equal(model.decode(codes), loaded.decode(codes))


def test_a_folder_of_another_model_type_is_refused_by_name(saved):
    _, folder = saved["one"]
    with pytest.raises(PretrainedError, match=r"config\.json: holds a 'vqvae' model \(VQVAE\), not a VQVAE2; "
                                              r"load it with VQVAE\.from_pretrained"):
        VQVAE2.from_pretrained(folder)


def test_the_model_is_put_on_the_device_asked_for(saved):
    loaded = VQVAE.from_pretrained(saved["one"][1], device="meta")
    assert {p.device.type for p in loaded.state_dict().values()} == {"meta"}


def test_save_refuses_a_non_empty_folder_and_overwrite_replaces_only_a_model_folder(tmp_path, saved):
    model, _ = saved["one"]
    target = tmp_path / "m"
    model.save_pretrained(target)
    with pytest.raises(PretrainedError, match=r"m: exists and is not empty"):
        model.save_pretrained(target)
    other = _model(TINY1, seed=1)
    other.save_pretrained(target, overwrite=True)
    _same_state(other, VQVAE.from_pretrained(target))
    (target / "notes.txt").write_text("mine")
    with pytest.raises(PretrainedError, match=r"holds notes\.txt, which is not part of a saved model"):
        model.save_pretrained(target, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    model.save_pretrained(tmp_path / "empty")  # an empty folder is as good as a new one
    _same_state(model, VQVAE.from_pretrained(tmp_path / "empty"))


# --------------------------------------------------------------------------------------------
# Errors: each names the file and the problem


def _copy(folder: Path, dest: Path) -> Path:
    dest.mkdir()
    for p in folder.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    edit(weights)
    save_file(weights, str(folder / "model.safetensors"))


def _drop_first(weights):
    weights.pop(sorted(weights)[0])


def _add_extra(weights):
    weights["extra.weight"] = torch.zeros(2)


def _reshape(weights):
    key = next(k for k in sorted(weights) if weights[k].dim() == 4)
    weights[key] = torch.zeros(1, *weights[key].shape[1:])


BROKEN = {
    # name: (how to break a copy of a saved one-level model, the file named, what the message says)
    "no folder": (lambda f: f.rename(f.with_name("gone")), "", "no such folder"),
    "a file": (lambda f: shutil.rmtree(f) or f.write_text("x"), "", "not a folder"),
    "no config": (lambda f: (f / "config.json").unlink(), "config.json", "missing"),
    "bad json": (lambda f: (f / "config.json").write_text("{model_type: vqvae"), "config.json", "not valid JSON"),
    "not an object": (lambda f: (f / "config.json").write_text("[1, 2]"), "config.json", "JSON object"),
    "no model_type": (lambda f: _edit_config(f, model_type=None), "config.json", "no 'model_type' key"),
    "unknown model_type": (lambda f: _edit_config(f, model_type="vqgan"), "config.json",
                           "unknown model_type 'vqgan'"),
    "unknown key": (lambda f: _edit_config(f, hiden=8), "config.json", "unknown VQ-VAE config keys: hiden"),
    "invalid value": (lambda f: _edit_config(f, codebook_size=0), "config.json", "codebook_size must be positive"),
    "wrong type": (lambda f: _edit_config(f, hidden="eight"), "config.json", "invalid VQ-VAE config"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "model.safetensors", "missing"),
    "corrupt weights": (lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 40), "model.safetensors",
                        "not a readable safetensors file"),
    "missing tensor": (lambda f: _weights(f, _drop_first), "model.safetensors", "do not fit the model in "
                       "config.json (missing "),
    "unexpected tensor": (lambda f: _weights(f, _add_extra), "model.safetensors", "unexpected extra.weight"),
    "other shape": (lambda f: _weights(f, _reshape), "model.safetensors", "size mismatch for "),
    "other config": (lambda f: _edit_config(f, codebook_size=13), "model.safetensors", "size mismatch for "),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_every_unusable_folder_gives_a_pretrained_error_naming_the_file(saved, tmp_path, case):
    folder = _copy(saved["one"][1], tmp_path / "model")
    breaker, name, needle = BROKEN[case]
    breaker(folder)
    with pytest.raises(PretrainedError) as info:
        VQVAE.from_pretrained(folder)
    assert isinstance(info.value, ValueError)
    assert str(folder / name if name else folder) in str(info.value)
    assert needle in str(info.value)


def test_a_newer_vqkits_keys_are_refused_with_both_versions(saved, tmp_path):
    folder = _copy(saved["one"][1], tmp_path / "model")
    _edit_config(folder, vqkit_version="9.0.0", dropout=0.1)
    with pytest.raises(PretrainedError, match=rf"dropout; written by vqkit 9\.0\.0, this is vqkit {__version__}"):
        VQVAE.from_pretrained(folder)


# --------------------------------------------------------------------------------------------
# Crash safety and no pickle


def _crashing_writer(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"half a safetensors file")
    raise KeyboardInterrupt  # a kill in the middle of writing the weights


def test_a_crash_while_saving_leaves_no_half_written_model(tmp_path, saved, monkeypatch):
    model, _ = saved["two"]
    monkeypatch.setattr(pretrained, "save_file", _crashing_writer)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary folder

    monkeypatch.undo()
    model.save_pretrained(tmp_path / "old")
    monkeypatch.setattr(pretrained, "save_file", _crashing_writer)
    with pytest.raises(KeyboardInterrupt):
        _model(TINY2, seed=3).save_pretrained(tmp_path / "old", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    _same_state(model, VQVAE2.from_pretrained(tmp_path / "old"))  # the old model, whole


def test_nothing_is_pickled_or_unpickled(saved, monkeypatch):
    for _, folder in saved.values():
        for p in folder.iterdir():
            head = p.read_bytes()[:2]
            assert head[:1] != b"\x80" and head != b"PK", p  # neither a pickle nor a torch.save zip

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling while loading a pretrained model")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    for model, folder in saved.values():
        _same_state(model, PretrainedMixin.from_pretrained(folder))


# --------------------------------------------------------------------------------------------
# Hub repo ids, through a stand-in huggingface_hub


def _fake_hub(monkeypatch, result):
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if isinstance(result, Exception):
            raise result
        return str(result)

    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(snapshot_download=snapshot_download))
    return calls


def test_a_hub_repo_id_is_downloaded_with_snapshot_download(saved, monkeypatch):
    model, folder = saved["two"]
    calls = _fake_hub(monkeypatch, folder)
    loaded = PretrainedMixin.from_pretrained("someone/tiny-vqvae2", revision="v1")
    assert type(loaded) is VQVAE2
    _same_state(model, loaded)
    # Only the two files are fetched: whatever else a repo holds (a pickle) is never downloaded.
    assert calls == [("someone/tiny-vqvae2", {"revision": "v1",
                                              "allow_patterns": ["config.json", "model.safetensors"]})]


def test_hub_failures_and_local_paths(saved, tmp_path, monkeypatch):
    calls = _fake_hub(monkeypatch, OSError("404 Repository Not Found"))
    with pytest.raises(PretrainedError, match=r"someone/nothing: no such folder, and it could not be downloaded "
                                              r"from the Hugging Face Hub \(OSError: 404"):
        VQVAE.from_pretrained("someone/nothing")
    # A missing path that is not a repo id, or given as a Path, never goes to the Hub.
    for name in (str(tmp_path / "a" / "b"), "a/b/c", Path("someone/else")):
        with pytest.raises(PretrainedError, match="no such folder$"):
            VQVAE.from_pretrained(name)
    assert len(calls) == 1
    with pytest.raises(PretrainedError, match="revision='v1' applies to Hub repo ids only"):
        VQVAE.from_pretrained(saved["one"][1], revision="v1")

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed: the import fails
    with pytest.raises(PretrainedError, match=r"someone/tiny: no such folder; to download it from the Hugging "
                                              r"Face Hub as a repo id, install huggingface_hub"):
        VQVAE.from_pretrained("someone/tiny")


# --------------------------------------------------------------------------------------------
# Priors: rebuilt through build_prior by the config's arch


def test_a_prior_round_trips_and_comes_back_as_its_arch(tmp_path):
    from vqkit.prior import GatedPixelCNN, PixelSNAIL, Prior, PriorConfig, build_prior

    torch.manual_seed(0)
    config = PriorConfig(arch="pixelsnail", codebook_size=8, height=4, width=4, channels=8, layers=2,
                         attention_heads=2, attention_every=1, num_classes=3, cond_codes=[[5, 2, 2]])
    prior = build_prior(config).eval()
    prior.save_pretrained(tmp_path / "prior")
    assert json.loads((tmp_path / "prior" / "config.json").read_text())["model_type"] == "prior"
    for loader in (Prior, PixelSNAIL, PretrainedMixin):
        loaded = loader.from_pretrained(tmp_path / "prior")
        assert type(loaded) is PixelSNAIL and not loaded.training and loaded.config == config
        _same_state(prior, loaded)
    g = torch.Generator().manual_seed(1)
    codes, labels = torch.randint(8, (2, 4, 4), generator=g), torch.tensor([0, 2])
    above = [torch.randint(5, (2, 2, 2), generator=g)]
    assert torch.equal(prior.nll(codes, labels, cond_codes=above), loaded.nll(codes, labels, cond_codes=above))
    wrong_class = r"config\.json: holds a PixelSNAIL, not a GatedPixelCNN; load it with Prior\.from_pretrained"
    with pytest.raises(PretrainedError, match=wrong_class):
        GatedPixelCNN.from_pretrained(tmp_path / "prior")
    _edit_config(tmp_path / "prior", arch="transformer")
    with pytest.raises(PretrainedError, match=r"config\.json: invalid prior config \(arch must be one of"):
        Prior.from_pretrained(tmp_path / "prior")


# --------------------------------------------------------------------------------------------
# vqkit export: a run folder's latest checkpoint as a model folder with a model card

LEGACY = Path(__file__).parent / "data" / "legacy"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A two-level run trained for 6 steps on the embedded sample, evaluated by vqkit eval."""
    from vqkit.cli.main import main
    from vqkit.data.datasets import sample_dir
    from vqkit.training.stage1 import TrainConfig, train

    root = tmp_path_factory.mktemp("export")
    train(root / "run", TINY2, TrainConfig(data=f"fashion-mnist:{sample_dir()}", steps=6, batch_size=8, lr=3e-3),
          progress=False, tensorboard=False)
    assert main(["eval", str(root / "run"), "--limit", "16"]) == 0
    return root / "run"


def _front_matter(card: str) -> dict[str, list[str] | str]:
    """The card's YAML front matter: ``key: value`` lines, and ``key:`` lines followed by
    ``- item`` lines (items plain or JSON-quoted)."""
    assert card.startswith("---\n")
    meta: dict = {}
    items: list[str] = []
    for line in card[4:card.index("\n---\n")].splitlines():
        if line.startswith("- "):
            items.append(json.loads(line[2:]) if line[2:].startswith('"') else line[2:])
        else:
            key, _, value = line.partition(":")
            items = []
            meta[key] = value.strip() or items
    return meta


def _run_usage(card: str, folder: Path) -> dict:
    """Execute the card's Python snippet against ``folder``; return its variables."""
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert f'from_pretrained("{folder.name}")' in snippet
    scope: dict = {}
    exec(snippet.replace(f'"{folder.name}"', json.dumps(str(folder))), scope)
    return scope


def test_export_writes_a_loadable_folder_and_a_card_with_the_eval_figures(run, tmp_path, capsys):
    from vqkit.cli.main import main
    from vqkit.runs import checkpoint as ckpt

    out = tmp_path / "tiny-vqvae2"
    assert main(["export", str(run), "-o", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith(f"wrote {out}: ")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    model, checkpoint = ckpt.load_model(run)
    loaded = VQVAE2.from_pretrained(out)
    _same_state(model, loaded)
    fingerprint = checkpoint.state["fingerprint"]
    assert ckpt.fingerprint(out / "model.safetensors") == fingerprint  # the checkpoint's own file

    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "vqkit"
    assert {"vq-vae", "vq-vae-2", "image-tokenizer"} <= set(meta["tags"])
    assert meta["datasets"] == ["zalando-datasets/fashion_mnist"]
    record = json.loads((run / "eval.json").read_text())
    train_config = json.loads((run / "config.json").read_text())["train"]
    for needle in (f"`{train_config['data']}`", "| image size | 28x28, 1 channel |", "| steps | 6 |",
                   "| batch size | 8 |", "| learning rate | 0.003 |", "| seed | 0 |",
                   "| top | 7x7 | 8 | 16x |", "| bottom | 14x14 | 16 | 4x |",
                   f"for the exported weights (checkpoint step 6, weights sha256 `{fingerprint[:12]}",
                   f"| {record['psnr']:.2f} dB | {record['mse']:.5f} | {record['bits_per_dim']:.3f} | "
                   f"{record['codes_used']}/24 ({record['usage']:.1%}) | {record['perplexity']:.1f} |",
                   f"sha256 `{fingerprint}`"):
        assert needle in card, needle
    for level in record["levels"]:
        assert (f"| {level['name']} | {level['shape'][0]}x{level['shape'][1]} | {level['codes_used']}/"
                f"{level['codebook_size']} ({level['usage']:.1%}) | {level['perplexity']:.1f} | "
                f"{level['psnr_upto']:.2f} dB | {level['psnr_without']:.2f} dB |") in card, level["name"]

    scope = _run_usage(card, out)  # the snippet runs as written, with this vqkit
    assert type(scope["model"]) is VQVAE2
    assert [tuple(c.shape) for c in scope["codes"]] == [(4, 7, 7), (4, 14, 14)]
    assert tuple(scope["decoded"].shape) == (4, 1, 28, 28)


def test_the_card_says_when_eval_json_is_of_another_checkpoint_or_missing(run, tmp_path):
    from vqkit.runs.export import export_run

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    record = json.loads((copy / "eval.json").read_text())
    (copy / "eval.json").write_text(json.dumps({**record, "step": 3, "fingerprint": "ab" * 32}))
    card = (export_run(copy, tmp_path / "a") / "README.md").read_text()
    assert "**These figures are of another checkpoint** (checkpoint step 3, weights sha256 `abababababab" in card
    assert f"{record['psnr']:.2f} dB" in card
    (copy / "eval.json").unlink()
    card = (export_run(copy, tmp_path / "b") / "README.md").read_text()
    assert f"No evaluation yet: run `vqkit eval {copy}`" in card and "PSNR" not in card
    (copy / "eval.json").write_text("{")
    with pytest.raises(ckpt.CheckpointError, match=r"eval\.json: not valid JSON"):
        export_run(copy, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_export_refuses_a_non_empty_folder_and_a_tampered_checkpoint(run, tmp_path, capsys):
    from vqkit.cli.main import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(run), "-o", str(out)]) == 2
    assert f"{out}: exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["export", str(run), "-o", str(tmp_path / "model")]) == 0
    assert main(["export", str(run), "-o", str(tmp_path / "model")]) == 2  # again: refused ...
    assert main(["export", str(run), "-o", str(tmp_path / "model"), "--overwrite"]) == 0  # ... unless asked

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = next((copy / "checkpoints").glob("step-*")) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["export", str(copy), "-o", str(tmp_path / "bad")]) == 2
    assert "do not match the fingerprint in state.json" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("name, arch", [("top", "GatedPixelCNN"), ("bottom", "PixelSNAIL")])
def test_a_prior_run_exports_too(tmp_path, name, arch):
    from safetensors.torch import load_file

    from vqkit.prior import Prior
    from vqkit.runs import checkpoint as ckpt
    from vqkit.runs.export import export_run

    out = export_run(LEGACY / name, tmp_path / name)
    loaded = Prior.from_pretrained(out)
    assert type(loaded).__name__ == arch
    weights = load_file(str(ckpt.latest_checkpoint(LEGACY / name).path / "model.safetensors"))
    state = loaded.state_dict()
    assert weights.keys() == state.keys() and all(torch.equal(weights[k], state[k]) for k in weights)
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "vqkit" and {"vq-vae", "vq-vae-2", "prior"} <= set(meta["tags"])
    source = json.loads((LEGACY / name / "config.json").read_text())["source"]
    assert f"the {name} level of the stage-1 model whose weights have sha256 `{source['fingerprint'][:12]}" in card
    assert f"No evaluation yet: run `vqkit eval {LEGACY / name}`" in card
    assert ckpt.fingerprint(out / "model.safetensors") == ckpt.latest_checkpoint(LEGACY / name).state["fingerprint"]
    scope = _run_usage(card, out)
    assert tuple(scope["codes"].shape) == (16, loaded.config.height, loaded.config.width)
