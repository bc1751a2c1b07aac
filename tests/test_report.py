"""vqkit report: the sections a run has, images that decode, and the page in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import DATA
from PIL import Image

from vqkit.cli.main import main
from vqkit.data.datasets import load_dataset
from vqkit.inspect.report import build_report, read_scalars
from vqkit.nn.vqvae import VQVAE2Config, VQVAEConfig
from vqkit.runs import checkpoint as ckpt
from vqkit.runs.codes import extract_codes, load_codes
from vqkit.training.prior import PriorTrainConfig, prior_config_for, train_prior
from vqkit.training.stage1 import TrainConfig, train

STAGE1 = VQVAEConfig(in_channels=1, hidden=8, res_hidden=4, num_res_blocks=1, downsample=2,
                     code_dim=4, codebook_size=16, restart_after=0)
STAGE1_SECTIONS = ["summary", "config", "curves", "reconstructions", "atlas-codes", "usage", "code-maps", "pca"]
CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    run = root / "run"
    train(run, STAGE1, TrainConfig(data=DATA, steps=6, batch_size=16, lr=3e-3, log_every=2), progress=False)
    model, checkpoint = ckpt.load_model(run)
    source = {"run": str(run.resolve()), "fingerprint": checkpoint.state["fingerprint"], "data": DATA,
              "split": "train"}
    extract_codes(model, load_dataset(DATA, "train"), root / "codes", limit=100, progress=False, source=source)
    codes = load_codes(root / "codes")
    train_prior(root / "prior", prior_config_for(codes, "pixelcnn", True, channels=8, layers=1),
                PriorTrainConfig(codes=str(root / "codes"), steps=4, batch_size=16, lr=3e-3, log_every=2,
                                 eval_every=2), progress=False)
    return run, root / "prior"


def _images(page: str) -> list[Image.Image]:
    """Every <img> of the page, decoded; fails on any image that is not an embedded PNG."""
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert page.count("<img ") == len(sources)
    images = []
    for src in sources:
        assert src.startswith("data:image/png;base64,"), src[:60]
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        img.load()
        assert img.format == "PNG" and min(img.size) > 10
        images.append(img)
    return images


def _ids(page: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)">', page)


def test_stage1_report_has_its_sections_and_no_broken_image(runs, tmp_path, capsys):
    run, _ = runs
    out = tmp_path / "report.html"
    assert main(["report", str(run), "--data", DATA, "--limit", "64", "-o", str(out)]) == 0
    page = out.read_text()
    # No evaluation yet: every section the run has, and no "eval".
    assert _ids(page) == STAGE1_SECTIONS
    images = _images(page)
    assert len(images) == 6
    # The reconstruction grid: two rows of 8 originals, each above its reconstructions, 28 px
    # tiles with 2 px gaps, enlarged twice.
    grid = images[1]
    assert grid.size == ((8 * 30 + 2) * 2, (4 * 30 + 2) * 2)
    first = load_dataset(DATA, "test").batch(torch.arange(1))[0][0, 0]
    assert np.array_equal(np.asarray(grid.convert("L"))[4:60:2, 4:60:2], first.numpy())
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    for sid in _ids(page):
        assert f'href="#{sid}"' in page
    # The atlas files the report embeds were written beside it.
    assert (tmp_path / "report_files" / "atlas_codes.png").exists()
    assert "wrote" in capsys.readouterr().out

    # vqkit eval keeps its figures in the run; the report then shows them.
    assert main(["eval", str(run), "--data", DATA, "--limit", "40", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    record = json.loads((run / "eval.json").read_text())
    assert record["step"] == 6 and record["psnr"] == printed["psnr"] and record["images"] == 40
    report = build_report(run, out, data=DATA, limit=64, progress=False)
    page = out.read_text()
    assert report.section_ids == _ids(page) == STAGE1_SECTIONS[:3] + ["eval"] + STAGE1_SECTIONS[3:]
    assert f"{record['psnr']:.4g}" in page and f"{record['bits_per_dim']:.4g}" in page


def test_vqvae2_report_has_an_atlas_and_eval_row_per_level(tmp_path, capsys):
    run = tmp_path / "run2"
    config = VQVAE2Config(in_channels=1, hidden=8, res_hidden=4, num_res_blocks=1, strides=[1, 1], code_dim=4,
                          codebook_sizes=[8, 16])
    train(run, config, TrainConfig(data=DATA, steps=2, batch_size=16, lr=3e-3, log_every=1), progress=False)
    assert main(["eval", str(run), "--data", DATA, "--limit", "16", "--json"]) == 0
    capsys.readouterr()
    report = build_report(run, tmp_path / "r2.html", data=DATA, limit=16, progress=False)
    page = report.path.read_text()
    assert report.section_ids == STAGE1_SECTIONS[:3] + ["eval", "reconstructions", "atlas-top", "atlas-bottom",
                                                        "usage", "code-maps", "pca"]
    assert len(_images(page)) == 7
    assert "<td>top</td>" in page and "<td>bottom</td>" in page and "psnr_without" in page
    assert "perplexity_top" in page and "perplexity_bottom" in page  # the curves' per-level tags


def test_training_curves_are_the_logged_scalars(runs):
    run, prior = runs
    curves = read_scalars(run / "tensorboard")
    steps, values = curves.series["train/loss"]
    assert steps == [2, 4, 6] and all(np.isfinite(values))
    assert "train/perplexity" in curves.series and "train/recon_loss" in curves.series
    assert read_scalars(prior / "tensorboard").series["val/bits_per_code"][0] == [2, 4]
    assert read_scalars(run / "missing").series == {}


def test_prior_report_shows_its_nll_curves_and_samples(runs, tmp_path):
    run, prior = runs
    report = build_report(prior, tmp_path / "prior.html", progress=False)
    page = report.path.read_text()
    assert report.section_ids == ["summary", "config", "validation", "curves", "samples"]
    assert "val/bits_per_code" in page and "NLL curves" in page
    # The held-out history is drawn with its best point, which the summary names.
    history = ckpt.read_validation(prior)["history"]
    best_step, best_value = min(history, key=lambda h: h[1])
    assert [s for s, _ in history] == [2, 4]
    assert f"best {best_value:.4f} at step {best_step}" in page
    assert f"<td>best checkpoint (held-out)</td><td>step {best_step}</td>" in page
    assert len(_images(page)) == 3
    # A stage-1 report with its prior and an extra image (e.g. a grid of vqkit sample).
    extra = tmp_path / "grid.png"
    Image.new("RGB", (40, 30), "red").save(extra)
    report = build_report(run, tmp_path / "all.html", data=DATA, limit=32, priors=[prior],
                          extra_images=[extra], progress=False)
    assert report.section_ids[-2:] == ["prior-0", "extra-0"]
    assert len(_images(report.path.read_text())) == 6 + 3 + 1


def test_a_bad_extra_image_is_one_clear_error(runs, tmp_path, capsys):
    run, _ = runs
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "r.html"
    assert main(["report", str(run), "--data", DATA, "--limit", "8", "--extra-image", str(bad),
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: cannot decode image" in err and "Traceback" not in err
    assert not out.exists()


def _chromium(page, tmp_path, size: str) -> tuple[np.ndarray, list[str]]:
    """Screenshot ``page`` at ``size`` ("W,H"); returns the pixels and the console lines."""
    shot = tmp_path / f"shot-{size.replace(',', 'x')}.png"
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", "--hide-scrollbars",
         f"--screenshot={shot}", f"--window-size={size}", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert shot.exists(), result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    with Image.open(shot) as img:
        return np.asarray(img.convert("L"), dtype=np.float64), console


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")
def test_report_opens_in_headless_chromium(runs, tmp_path):
    run, _ = runs
    # The console check catches a page that logs errors (so that it can fail).
    broken = tmp_path / "broken.html"
    broken.write_text("<!doctype html><p>x</p><script>console.error('boom'); undefinedFunction();</script>")
    _, console = _chromium(broken, tmp_path, "400,300")
    assert any("boom" in line for line in console) and any("Uncaught" in line for line in console)

    report = build_report(run, tmp_path / "report.html", data=DATA, limit=32, progress=False)
    for size in ("390,844", "1280,900"):
        pixels, console = _chromium(report.path, tmp_path, size)
        width, height = map(int, size.split(","))
        assert pixels.shape == (height, width)
        assert console == []
        assert pixels.std() > 10, f"blank screenshot at {size}"
