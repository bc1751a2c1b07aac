"""Every quantizer kind end to end from the command line, on the embedded sample: `train
--quantizer`, then eval, extract, train-prior, sample, compress/decompress (uniform and
prior-coded) and inspect on its codes. One short chain per kind; tiny models, a few steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import DATA, cli_ok

from vqkit.cli.main import main
from vqkit.codec.codec import Codec
from vqkit.data.images import load_image, save_png
from vqkit.nn.scalar import FSQ, LFQ
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.codes import load_codes

PRIOR = ["--steps", "3", "--batch-size", "8", "--channels", "8", "--layers", "1", "--no-tensorboard"]



@pytest.mark.parametrize("spec, kind, k", [
    ("vq:cosine,rotation,factor_dim=4", "vq", 128),
    ("fsq:5,4,3", FSQ, 60),
    ("lfq:5", LFQ, 32),
], ids=["vq-options", "fsq", "lfq"])
def test_train_with_a_quantizer_then_every_command_on_its_codes(spec, kind, k, tmp_path, capsys):
    run = tmp_path / "run"
    cli_ok(capsys, ["train", "--preset", "demo", "--quantizer", spec, "--steps", "3", "--batch-size", "16",
                 "--no-tensorboard", "-o", run, "--data", DATA])
    model_json = ckpt.read_config(run)["model"]
    assert model_json["codebook_size"] == k and model_json["quantizer"]["kind"] == spec.split(":")[0]
    model, _ = ckpt.load_model(run)
    quantizer = model.quantizers[0]
    assert quantizer.codebook_size == k and (kind == "vq" or isinstance(quantizer, kind))

    record = json.loads(cli_ok(capsys, ["eval", run, "--limit", "16", "--json"]))
    assert record["codebook_size"] == k and 1 <= record["codes_used"] <= k and 0 < record["mse"] < 1

    codes_dir = tmp_path / "codes"
    cli_ok(capsys, ["extract", run, "--limit", "24", "-o", codes_dir])
    codes = load_codes(codes_dir)
    assert codes.codebook_size == k and codes.shape == (7, 7)
    maps = codes.batch(torch.arange(len(codes)))[0]
    assert 0 <= int(maps.min()) and int(maps.max()) < k

    prior = tmp_path / "prior"
    cli_ok(capsys, ["train-prior", codes_dir, "--arch", "pixelcnn", *PRIOR, "-o", prior])
    grid = tmp_path / "samples.png"
    cli_ok(capsys, ["sample", prior, "-n", "2", "-o", grid])
    assert grid.exists()

    image = tmp_path / "in.png"
    save_png((torch.rand(1, 28, 28) * 255).to(torch.uint8), image)
    original = load_image(image, None, 1)
    for name, compress, decompress, priors in [("uniform", ["--uniform"], [], []),
                                               ("prior", ["--prior", prior], ["--prior", prior], [prior])]:
        vq_file, back = tmp_path / f"{name}.vq", tmp_path / f"{name}.png"
        cli_ok(capsys, ["compress", run, image, *compress, "-o", vq_file])
        cli_ok(capsys, ["decompress", run, vq_file, *decompress, "-o", back])
        assert torch.equal(load_image(back, None, 1), Codec.load(run, priors).reconstruct(original, name))

    out = cli_ok(capsys, ["inspect", run, "--limit", "16", "-o", tmp_path / "inspect"])
    assert f"/{k} codes used" in out
    counts = json.loads((tmp_path / "inspect" / "inspect.json").read_text())
    assert counts["levels"][0]["codebook_size"] == k
    assert np.isfinite(record["perplexity"])


def test_bad_quantizer_options_are_one_line_errors(tmp_path, capsys):
    for argv, needle in [(["--quantizer", "fsq:8,1"], "integers >= 2"),
                         (["--quantizer", "fsq:4,4", "--quantizer", "lfq:3"], "for a model of 1 level(s)"),
                         (["--quantizer", "pq"], "unknown quantizer kind 'pq'")]:
        code = main(["train", "--preset", "demo", *argv, "--steps", "1", "-o", str(tmp_path / "run"), "--data", DATA])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("vqkit: error: ") and needle in err and "Traceback" not in err
        assert not (tmp_path / "run").exists()
