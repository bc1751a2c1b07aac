"""Behaviour tests for the vqkit command line, run in-process on the embedded sample."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_ok
from PIL import Image

from vqkit.cli.main import main
from vqkit.data.datasets import from_model, load_dataset, sample_dir, to_model
from vqkit.runs import checkpoint as ckpt

DATA = f"fashion-mnist:{sample_dir()}"



def _fails(capsys, argv: list[str], *needles: str) -> str:
    """The command exits 2 with one `vqkit: error:` line naming what is wrong, no traceback."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("vqkit: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", "--preset", "demo", "--steps", "3", "--batch-size", "16",
                 "--no-tensorboard", "-o", str(folder), "--data", DATA])
    assert code == 0
    return folder


@pytest.mark.parametrize("precision, says", [("fp32", "training on cpu, fp32\n"),
                                              ("bf16", "training on cpu, bf16 autocast, channels_last\n")])
def test_train_says_where_it_runs(capsys, tmp_path, precision, says):
    out = cli_ok(capsys, ["train", "--preset", "demo", "--steps", "1", "--batch-size", "4", "--no-tensorboard",
                          "--device", "cpu", "--precision", precision, "-o", tmp_path / "run", "--data", DATA])
    assert out.startswith(says)


def test_train_writes_a_loadable_run(run):
    model, ck = ckpt.load_model(run)
    assert ck.step == 3
    config = ckpt.read_config(run)
    assert config["train"]["data"] == DATA and config["train"]["steps"] == 3
    assert config["model"]["codebook_size"] == 128  # the demo preset
    assert not (run / "tensorboard").exists()


def test_eval_json(run, capsys):
    out = cli_ok(capsys, ["eval", run, "--limit", "64", "--json"])
    result = json.loads(out)
    for key in ("mse", "psnr", "bits_per_dim", "codes_used", "perplexity"):
        assert key in result
    assert result["images"] == 64 and result["split"] == "test"
    assert 0 < result["mse"] < 1
    assert result["psnr"] == pytest.approx(10 * math.log10(1 / result["mse"]), rel=1e-9)
    assert 1 <= result["codes_used"] <= 128
    assert 1 <= result["perplexity"] <= result["codes_used"] + 1e-6
    assert result["bits_per_dim"] > 0


def test_eval_text(run, capsys):
    out = cli_ok(capsys, ["eval", run, "--limit", "16"])
    assert "16 images" in out and "PSNR" in out


def test_reconstruct_grid(run, capsys, tmp_path):
    grid = tmp_path / "grid.png"
    cli_ok(capsys, ["reconstruct", run, "-n", "4", "-o", grid])
    with Image.open(grid) as img:
        assert img.format == "PNG"
        assert img.size == (4 * (28 + 2) + 2, 2 * (28 + 2) + 2)  # (width, height)
        pixels = np.array(img)
    # The top row holds the first four test images, unchanged.
    test = load_dataset(DATA, "test")
    for i in range(4):
        tile = pixels[2:30, 2 + 30 * i:30 + 30 * i]
        assert np.array_equal(tile, test.images[i, 0].numpy())


def test_encode_then_decode(run, capsys, tmp_path):
    codes_path = tmp_path / "codes.npy"
    # The references are computed here, on the CPU: so are the commands, also where CUDA is present.
    cli_ok(capsys, ["encode", run, "--data", DATA, "--limit", "5", "--device", "cpu", "-o", codes_path])
    codes = np.load(codes_path, allow_pickle=False)
    assert codes.shape == (5, 7, 7) and codes.dtype == np.uint16

    model, _ = ckpt.load_model(run)
    images = load_dataset(DATA, "test").images[:5]
    [expected_codes] = model.encode(to_model(images))
    assert np.array_equal(codes, expected_codes.numpy())
    expected = from_model(model.decode([expected_codes]))

    grid = tmp_path / "out.png"
    cli_ok(capsys, ["decode", run, codes_path, "--device", "cpu", "-o", grid])
    with Image.open(grid) as img:
        pixels = np.array(img)
    assert pixels.shape == (30 + 2, 5 * 30 + 2)
    for i in range(5):
        assert np.array_equal(pixels[2:30, 2 + 30 * i:30 + 30 * i], expected[i, 0].numpy())

    folder = tmp_path / "dir"
    cli_ok(capsys, ["decode", run, codes_path, "--device", "cpu", "-o", f"{folder}/"])
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(5)]
    for i, f in enumerate(files):
        with Image.open(f) as img:
            assert np.array_equal(np.array(img), expected[i, 0].numpy())


@pytest.mark.parametrize("command", ["eval", "reconstruct", "levels", "encode", "decode", "extract", "sample",
                                     "inspect"])
def test_inference_commands_take_a_device(run, capsys, tmp_path, command):
    """--device cpu runs where --device is not known would be an argparse error; a CUDA device
    that is not there is one clear line, before any work."""
    args = {"eval": [run, "--limit", "8"], "reconstruct": [run, "-n", "2", "-o", tmp_path / "r.png"],
            "levels": [run, "-n", "2", "-o", tmp_path / "l.png"],
            "encode": [run, "--data", DATA, "--limit", "2", "-o", tmp_path / "c.npy"],
            "decode": [run, tmp_path / "c.npy", "-o", tmp_path / "d.png"],
            "extract": [run, "--limit", "8", "-o", tmp_path / "codes"],
            "sample": [tmp_path / "prior"], "inspect": [run, "--limit", "8", "-o", tmp_path / "inspect"]}[command]
    if command == "decode":
        np.save(tmp_path / "c.npy", np.zeros((2, 7, 7), np.uint16))
    if command == "sample":
        cli_ok(capsys, ["extract", run, "--limit", "16", "-o", tmp_path / "codes"])
        cli_ok(capsys, ["train-prior", tmp_path / "codes", "--steps", "1", "--batch-size", "4", "--channels", "8",
                        "--layers", "1", "--no-tensorboard", "--device", "cpu", "-o", tmp_path / "prior"])
        args += ["-n", "2", "-o", tmp_path / "s.png"]
    cli_ok(capsys, [command, *args, "--device", "cpu"])
    if not torch.cuda.is_available():
        _fails(capsys, [command, *args, "--device", "cuda"], "'cuda'", "CUDA is not available")


def test_encode_image_files(run, capsys, tmp_path):
    test = load_dataset(DATA, "test")
    paths = []
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(test.images[i, 0].numpy()).save(p)
        paths.append(p)
    out = tmp_path / "codes.npy"
    cli_ok(capsys, ["encode", run, *paths, "-o", out])
    model, _ = ckpt.load_model(run)
    assert np.array_equal(np.load(out), model.encode(to_model(test.images[:2]))[0].numpy())


# --------------------------------------------------------------------------------------------
# Errors: exit code 2, one line naming the file, no traceback


def test_eval_missing_run(capsys, tmp_path):
    missing = tmp_path / "no-such-run"
    _fails(capsys, ["eval", missing], missing)


def test_decode_non_npy_file(run, capsys, tmp_path):
    bad = tmp_path / "codes.txt"
    bad.write_text("these are not codes\n")
    line = _fails(capsys, ["decode", run, bad, "-o", tmp_path / "out.png"], bad, ".npy")
    assert "pickle" not in line  # a text file is not "pickled data"
    assert not (tmp_path / "out.png").exists()


def test_decode_npz_archive(run, capsys, tmp_path):
    bad = tmp_path / "codes.npz"
    np.savez(bad, codes=np.zeros((2, 7, 7), dtype=np.uint16))
    _fails(capsys, ["decode", run, bad, "-o", tmp_path / "out.png"], bad, ".npy")


def test_decode_truncated_npy(run, capsys, tmp_path):
    bad = tmp_path / "codes.npy"
    np.save(bad, np.zeros((20, 7, 7), dtype=np.uint16))
    bad.write_bytes(bad.read_bytes()[:300])
    _fails(capsys, ["decode", run, bad, "-o", tmp_path / "out.png"], bad)


def test_decode_missing_codes_file(run, capsys, tmp_path):
    missing = tmp_path / "missing.npy"
    _fails(capsys, ["decode", run, missing, "-o", tmp_path / "out.png"], missing)


def test_decode_out_of_range_codes(run, capsys, tmp_path):
    bad = tmp_path / "codes.npy"
    np.save(bad, np.full((2, 7, 7), 128, dtype=np.uint16))
    line = _fails(capsys, ["decode", run, bad, "-o", tmp_path / "out.png"], bad)
    assert "128" in line
    assert not (tmp_path / "out.png").exists()


def test_decode_float_codes(run, capsys, tmp_path):
    bad = tmp_path / "codes.npy"
    np.save(bad, np.zeros((2, 7, 7), dtype=np.float32))
    _fails(capsys, ["decode", run, bad, "-o", tmp_path / "out.png"], bad)


def test_decode_never_unpickles(run, capsys, tmp_path, monkeypatch):
    bad = tmp_path / "codes.npy"
    np.save(bad, np.array([{"a": 1}, [2, 3]], dtype=object))  # np.save pickles object arrays
    import pickle

    def forbidden(*args, **kwargs):
        raise AssertionError("decode unpickled a file")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    _fails(capsys, ["decode", run, bad, "-o", tmp_path / "out.png"], bad)


def test_train_bad_data_spec(capsys, tmp_path):
    out = tmp_path / "run"
    _fails(capsys, ["train", "--preset", "demo", "--steps", "1", "--no-tensorboard", "-o", out,
                    "--data", "nonsense"], "nonsense")
    assert not (out / "config.json").exists()


def test_train_missing_data_folder(capsys, tmp_path):
    missing = tmp_path / "nowhere"
    _fails(capsys, ["train", "--preset", "demo", "--steps", "1", "--no-tensorboard",
                    "-o", tmp_path / "run", "--data", f"fashion-mnist:{missing}"], missing)


def test_train_corrupt_config_json(capsys, tmp_path):
    config = tmp_path / "model.json"
    config.write_text('{"hidden": 8,')
    _fails(capsys, ["train", "--config", config, "--steps", "1", "--no-tensorboard",
                    "-o", tmp_path / "run", "--data", DATA], config)
    assert not (tmp_path / "run" / "config.json").exists()


def test_train_config_with_unknown_key(capsys, tmp_path):
    config = tmp_path / "model.json"
    config.write_text(json.dumps({"in_channels": 1, "layers": 3}))
    _fails(capsys, ["train", "--config", config, "--steps", "1", "--no-tensorboard",
                    "-o", tmp_path / "run", "--data", DATA], config, "layers")


def test_train_existing_run_without_resume(run, capsys):
    before = ckpt.latest_checkpoint(run).step
    _fails(capsys, ["train", "--preset", "demo", "--steps", "5", "--no-tensorboard",
                    "-o", run, "--data", DATA], run, "--resume")
    assert ckpt.latest_checkpoint(run).step == before


def test_encode_corrupt_image(run, capsys, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    out = tmp_path / "codes.npy"
    _fails(capsys, ["encode", run, bad, "-o", out], bad)
    assert not out.exists()


def test_corrupt_checkpoint_reported_by_eval(capsys, tmp_path, run):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    weights = ckpt.latest_checkpoint(copy).path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _fails(capsys, ["eval", copy, "--limit", "4"], weights)


def test_module_help_subprocess():
    result = subprocess.run([sys.executable, "-m", "vqkit", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("train", "eval", "reconstruct", "encode", "decode", "demo"):
        assert command in result.stdout
