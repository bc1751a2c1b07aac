"""Behaviour test for `vqkit extract`, run in-process on a tiny run over the embedded sample."""

from __future__ import annotations

import numpy as np
import torch

from vqkit.cli.main import main
from vqkit.data.datasets import load_dataset, sample_dir, to_model
from vqkit.nn.vqvae import VQVAEConfig
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.codes import load_codes
from vqkit.training.stage1 import TrainConfig, train

DATA = f"fashion-mnist:{sample_dir()}"


def test_extract_writes_the_run_codes(tmp_path, capsys):
    run = tmp_path / "run"
    config = VQVAEConfig(in_channels=1, hidden=8, res_hidden=4, num_res_blocks=1, downsample=2,
                         code_dim=4, codebook_size=16, restart_after=0)
    train(run, config, TrainConfig(data=DATA, steps=2, batch_size=8), progress=False,
          tensorboard=False)
    out = tmp_path / "codes"

    assert main(["extract", str(run), "--data", DATA, "--limit", "10", "--batch-size", "4",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "10 code maps of 7 x 7" in printed and "K = 16" in printed

    model, checkpoint = ckpt.load_model(run)
    codes = load_codes(out)
    assert len(codes) == 10 and codes.shape == (7, 7) and codes.codebook_size == 16
    train_set = load_dataset(DATA, "train")
    maps, labels = codes.batch(torch.arange(10))
    assert torch.equal(maps, model.encode(to_model(train_set.images[:10]))[0])
    assert torch.equal(labels, train_set.labels[:10])
    source = codes.manifest["source"]
    assert source["fingerprint"] == checkpoint.state["fingerprint"]
    assert source["step"] == 2 and source["data"] == DATA and source["split"] == "train"
    assert source["run"] == str(run.resolve())

    # A second extraction into the same folder is refused with one error line naming it.
    before = np.load(out / "codes.npy")
    assert main(["extract", str(run), "--data", DATA, "--limit", "3", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vqkit: error: ") and str(out) in err and "--overwrite" in err
    assert np.array_equal(np.load(out / "codes.npy"), before)
