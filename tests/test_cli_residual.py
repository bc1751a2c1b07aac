"""Residual VQ end to end from the command line, on the embedded sample: `train --quantizer
residual:2` gives a model of two code maps of one resolution, and every command takes them as a
hierarchy's levels: eval (per stage), encode/decode, extract (one set per stage), train-prior
(stage 1 conditioned on stage 0), sample, compress/decompress (uniform and prior-coded, exact;
a one-stage preview), inspect and export."""

from __future__ import annotations

import json

import numpy as np
import torch
from conftest import DATA, cli_ok

from vqkit.cli.main import main
from vqkit.codec.codec import Codec
from vqkit.data.datasets import from_model, to_model
from vqkit.data.images import load_image, save_png
from vqkit.nn.residual import ResidualVQ
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.codes import load_codes

PRIOR = ["--steps", "3", "--batch-size", "8", "--channels", "8", "--layers", "1", "--no-tensorboard"]



def test_residual_codes_through_every_command(tmp_path, capsys):
    run = tmp_path / "run"
    cli_ok(capsys, ["train", "--preset", "demo", "--quantizer", "residual:2", "--steps", "3",
                 "--batch-size", "16", "--no-tensorboard", "-o", run, "--data", DATA])
    model_json = ckpt.read_config(run)["model"]
    assert model_json["quantizer"] == {"kind": "residual", "stages": 2} and model_json["codebook_size"] == 128
    model, _ = ckpt.load_model(run)
    assert isinstance(model.quantizers[0], ResidualVQ) and model.num_maps == 2

    record = json.loads(cli_ok(capsys, ["eval", run, "--limit", "16", "--json"]))
    assert [lv["name"] for lv in record["levels"]] == ["codes.0", "codes.1"]
    assert record["codebook_size"] == 256 and all(lv["codebook_size"] == 128 for lv in record["levels"])
    # The ELBO's latent term counts log2 K bits for each stage's 7x7 codes.
    assert abs(record["bits_per_dim"] - (record["nll_bits_per_dim"] + 2 * 49 * 7 / 784)) < 1e-9

    encoded = tmp_path / "encoded"
    cli_ok(capsys, ["encode", run, "--data", DATA, "--split", "train", "--limit", "5", "-o", encoded])
    assert sorted(p.name for p in encoded.iterdir()) == ["codes.0.npy", "codes.1.npy"]
    cli_ok(capsys, ["decode", run, encoded, "-o", tmp_path / "decoded.png"])

    codes_dir = tmp_path / "codes"
    cli_ok(capsys, ["extract", run, "--limit", "24", "-o", codes_dir])
    stage0, stage1 = load_codes(codes_dir / "codes.0"), load_codes(codes_dir / "codes.1")
    assert stage0.shape == stage1.shape == (7, 7) and stage0.codebook_size == 128
    assert stage1.manifest["source"]["level_index"] == 1
    for s, stage in enumerate((stage0, stage1)):  # encode and extract give the same maps
        encoded_maps = torch.from_numpy(np.load(encoded / f"codes.{s}.npy").astype(np.int64))
        assert torch.equal(encoded_maps, stage.batch(torch.arange(5))[0])

    top, lower = tmp_path / "prior0", tmp_path / "prior1"
    cli_ok(capsys, ["train-prior", codes_dir / "codes.0", "--arch", "pixelcnn", *PRIOR, "-o", top])
    cli_ok(capsys, ["train-prior", codes_dir / "codes.1", "--cond", codes_dir / "codes.0", "--arch", "pixelcnn",
                 *PRIOR, "-o", lower])
    assert ckpt.read_config(lower, kind="prior")["source"]["cond_levels"] == ["codes.0"]
    grid = tmp_path / "samples.png"
    cli_ok(capsys, ["sample", top, lower, "-n", "2", "-o", grid])
    assert grid.exists()
    assert main(["sample", str(top), "-o", str(grid)]) == 2
    assert "one prior per code map" in capsys.readouterr().err

    image = tmp_path / "in.png"
    save_png((torch.rand(1, 28, 28) * 255).to(torch.uint8), image)
    original = load_image(image, None, 1)
    for name, flags, priors in [("uniform", ["--uniform"], []), ("prior", ["--prior", top, "--prior", lower],
                                                                 [top, lower])]:
        vq_file, back = tmp_path / f"{name}.vq", tmp_path / f"{name}.png"
        out = cli_ok(capsys, ["compress", run, image, *flags, "-o", vq_file])
        assert "progressive: codes.0" in out
        codec = Codec.load(run, priors)
        decode_flags = [f for f in flags if f != "--uniform"]
        cli_ok(capsys, ["decompress", run, vq_file, *decode_flags, "-o", back])
        assert torch.equal(load_image(back, None, 1), codec.reconstruct(original, name))
        # The first stage's bytes alone: the image decoded from stage 0.
        cli_ok(capsys, ["decompress", run, vq_file, *decode_flags, "--levels", "1", "-o", tmp_path / "preview.png"])
        header, codes = codec.decompress_codes(vq_file.read_bytes())
        assert [(h, w) for h, w, _ in header.levels] == [(7, 7), (7, 7)]
        preview = from_model(model.decode_levels([codes[0][None]], 1))[0]
        assert torch.equal(load_image(tmp_path / "preview.png", None, 1), preview)
        assert not torch.equal(preview, load_image(back, None, 1))
    assert torch.equal(codes[0], model.encode(to_model(original[None].float()))[0][0])

    out = cli_ok(capsys, ["inspect", run, "--limit", "16", "-o", tmp_path / "inspect"])
    assert "codes.1" in out
    inspection = json.loads((tmp_path / "inspect" / "inspect.json").read_text())
    assert [lv["name"] for lv in inspection["levels"]] == ["codes.0", "codes.1"]

    cli_ok(capsys, ["export", run, "-o", tmp_path / "export"])
    card = (tmp_path / "export" / "README.md").read_text()
    assert "1 level, 2 code maps" in card and "| codes.1 | 7x7 | 128 |" in card
    assert "Quantizer: `{\"kind\": \"residual\", \"stages\": 2}` (every level)" in card


def test_a_bad_residual_spec_is_a_one_line_error(tmp_path, capsys):
    for spec, needle in [("residual:0", "'stages' must be an integer in 1..8"),
                         ("residual", "needs 'stages'"), ("residual:2,factor_dim=4", "unknown residual option")]:
        code = main(["train", "--preset", "demo", "--quantizer", spec, "--steps", "1", "--data", DATA,
                     "-o", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and "--quantizer" in err and len(err.strip().splitlines()) == 1
