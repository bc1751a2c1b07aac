"""Prepared image sets (vqkit.data.prepared): equal to decoding each file, resumable, and
refusing torn or foreign sets with a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA
from PIL import Image

from vqkit.data import prepared
from vqkit.data.datasets import DataError, load_dataset
from vqkit.data.prepared import PreparedImageSet, prepare


def _folder(root: Path, sizes=((12, 10), (9, 14), (16, 16))) -> Path:
    """Two classes in train/ and test/ subfolders, images of several sizes and colours."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 5), ("test", 2)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                h, w = sizes[i % len(sizes)]
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                    root / split / cls / f"{i}.png")
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    return _folder(tmp_path / "src")


@pytest.mark.parametrize("workers", [0, 2])
def test_prepared_set_equals_decoding_each_file(tmp_path, folder, workers):
    result = prepare(f"folder:{folder}", tmp_path / "set", image_size=8, workers=workers)
    assert result.counts == {"train": 10, "test": 4} and result.skipped == 0
    for split in ("train", "test", "all"):
        want = load_dataset(f"folder:{folder}", split, image_size=8)
        got = load_dataset(f"prepared:{tmp_path / 'set'}", split)
        assert isinstance(got, PreparedImageSet) and len(got) == len(want)
        assert got.class_names == want.class_names == ["cat", "dog"]
        assert (got.channels, got.height, got.width) == (3, 8, 8)
        # Unsorted, repeated and neighbouring indices: rows are read sorted and put back.
        idx = torch.tensor([3, 0, 1, 2, 2, len(want) - 1])
        x, y = got.batch(idx)
        x_want, y_want = want.batch(idx)
        assert torch.equal(x, x_want) and torch.equal(y, y_want)
        assert torch.equal(got[1][0], want[1][0]) and got[1][1] == want[1][1]
        assert np.array_equal(got.images, want.batch(torch.arange(len(want)))[0].numpy())
    listing = [json.loads(line) for line in (tmp_path / "set" / "files.jsonl").read_text().splitlines()]
    assert len(listing) == 14 and listing[0][0] == "train/cat/0.png"
    assert listing[0][1] == (folder / "train/cat/0.png").stat().st_size and len(listing[0][2]) == 64


def test_prepared_from_idx_resizes_like_load_dataset(tmp_path):
    prepare(DATA, tmp_path / "set", image_size=14)
    for split in ("train", "test"):
        want = load_dataset(DATA, split, image_size=14)
        got = load_dataset(f"prepared:{tmp_path / 'set'}", split, image_size=14)
        assert np.array_equal(got.images, want.images.numpy())
        assert torch.equal(got.labels, want.labels) and got.class_names == want.class_names


def test_zero_size_batch(tmp_path, folder):
    prepare(f"folder:{folder}", tmp_path / "set", image_size=8)
    x, y = load_dataset(f"prepared:{tmp_path / 'set'}").batch(torch.zeros(0, dtype=torch.int64))
    assert x.shape == (0, 3, 8, 8) and x.dtype == torch.uint8 and y.shape == (0,)


def test_unreadable_file_stops_or_is_left_out(tmp_path, folder):
    bad = folder / "train" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DataError, match=r"dog/1\.png: cannot decode.*--skip-bad"):
        prepare(f"folder:{folder}", tmp_path / "set", image_size=8)
    assert not (tmp_path / "set").exists()
    # Rerunning with --skip-bad resumes the same plan and leaves the file out.
    result = prepare(f"folder:{folder}", tmp_path / "set", image_size=8, skip_bad=True)
    assert result.counts == {"train": 9, "test": 4} and result.skipped == 1
    got = load_dataset(f"prepared:{tmp_path / 'set'}", "train")
    want = load_dataset(f"folder:{folder}", "train", image_size=8, skip_bad=True)
    assert torch.equal(got.batch(torch.arange(9))[0], want.batch(torch.arange(9))[0])
    assert torch.equal(got.labels, want.batch(torch.arange(9))[1])
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert manifest["skipped"][0]["path"] == "train/dog/1.png"


def test_interrupted_prepare_resumes(tmp_path, folder, monkeypatch):
    monkeypatch.setattr(prepared, "CHUNK_FILES", 2)
    monkeypatch.setattr(prepared, "SAVE_EVERY", 0.0)
    decode = prepared._Decode.__getitem__

    def interrupted(self, c):
        if c == 3:
            raise KeyboardInterrupt
        return decode(self, c)

    monkeypatch.setattr(prepared._Decode, "__getitem__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(f"folder:{folder}", tmp_path / "set", image_size=8, workers=0)
    assert not (tmp_path / "set").exists() and (tmp_path / ".set.partial" / "progress.json").exists()
    with pytest.raises(DataError, match=r"unfinished `vqkit prepare`: run it again to resume"):
        load_dataset(f"prepared:{tmp_path / 'set'}")

    monkeypatch.setattr(prepared._Decode, "__getitem__", decode)
    result = prepare(f"folder:{folder}", tmp_path / "set", image_size=8, workers=0)
    assert result.resumed == 6  # three chunks of two files were done before the interruption
    fresh = prepare(f"folder:{folder}", tmp_path / "fresh", image_size=8, workers=0)
    assert fresh.resumed == 0
    a, b = tmp_path / "set", tmp_path / "fresh"
    assert (a / "images.npy").read_bytes() == (b / "images.npy").read_bytes()
    assert (a / "labels.npy").read_bytes() == (b / "labels.npy").read_bytes()
    assert (a / "files.jsonl").read_text() == (b / "files.jsonl").read_text()
    assert not (tmp_path / ".set.partial").exists()


def test_changed_source_starts_again(tmp_path, folder, monkeypatch):
    monkeypatch.setattr(prepared, "SAVE_EVERY", 0.0)
    monkeypatch.setattr(prepared._Decode, "__getitem__", lambda self, c: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare(f"folder:{folder}", tmp_path / "set", image_size=8, workers=0)
    monkeypatch.undo()
    assert prepare(f"folder:{folder}", tmp_path / "set", image_size=4, workers=0).resumed == 0
    assert load_dataset(f"prepared:{tmp_path / 'set'}").height == 4


@pytest.fixture
def made(tmp_path, folder) -> Path:
    prepare(f"folder:{folder}", tmp_path / "set", image_size=8)
    return tmp_path / "set"


def test_torn_images_are_refused(made):
    path = made / "images.npy"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"images\.npy: .*(torn|not a readable)"):
        load_dataset(f"prepared:{made}")


def test_foreign_or_altered_sets_are_refused(made, tmp_path):
    with pytest.raises(DataError, match=r"not a prepared set \(no manifest\.json\)"):
        load_dataset(f"prepared:{tmp_path / 'src'}")
    manifest = json.loads((made / "manifest.json").read_text())
    (made / "manifest.json").write_text(json.dumps({**manifest, "kind": "vqkit-code-set"}))
    with pytest.raises(DataError, match=r"manifest\.json: not a vqkit prepared image set"):
        load_dataset(f"prepared:{made}")
    (made / "manifest.json").write_text(json.dumps({**manifest, "shape": [14, 3, 8, 9]}))
    with pytest.raises(DataError, match=r"images\.npy: holds uint8 \(14, 3, 8, 8\), but the manifest says"):
        load_dataset(f"prepared:{made}")
    (made / "manifest.json").write_text(json.dumps({**manifest, "splits": {"train": [0, 3], "test": [4, 14]}}))
    with pytest.raises(DataError, match=r"invalid or missing splits"):
        load_dataset(f"prepared:{made}")
    (made / "manifest.json").write_text(json.dumps(manifest))
    np.save(made / "labels.npy", np.array([{"x": 1}] * 14, dtype=object))
    with pytest.raises(DataError, match=r"labels\.npy: not a readable \.npy array"):
        load_dataset(f"prepared:{made}")


def test_image_size_must_match(made):
    assert load_dataset(f"prepared:{made}", image_size=8).height == 8
    with pytest.raises(DataError, match=r"prepared at 8x8, not at the 16x16 asked for.*--image-size 16"):
        load_dataset(f"prepared:{made}", image_size=16)


def test_prepare_refuses_to_replace_other_folders(made, tmp_path, folder):
    with pytest.raises(DataError, match="already exists; pass --overwrite"):
        prepare(f"folder:{folder}", made, image_size=8)
    assert prepare(f"folder:{folder}", made, image_size=4, overwrite=True).counts["train"] == 10
    assert load_dataset(f"prepared:{made}").height == 4
    with pytest.raises(DataError, match="is not a vqkit prepared set; refusing to replace it"):
        prepare(f"folder:{folder}", folder, image_size=8, overwrite=True)
    with pytest.raises(DataError, match="already a prepared set"):
        prepare(f"prepared:{made}", tmp_path / "again")


def test_prepare_and_train_from_the_command_line(tmp_path, folder, capsys):
    from vqkit.cli.main import main

    out = tmp_path / "set"
    assert main(["prepare", f"folder:{folder}", "-o", str(out), "--image-size", "8", "--workers", "0"]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out}: 10 train and 4 test images" in said and f"--data prepared:{out}" in said
    assert main(["prepare", f"folder:{folder}", "-o", str(out), "--image-size", "8"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["prepare", f"folder:{tmp_path / 'nowhere'}", "-o", str(tmp_path / "x")]) == 2
    assert "is not an existing directory" in capsys.readouterr().err

    run = tmp_path / "run"
    assert main(["train", "--data", f"prepared:{out}", "--preset", "demo", "--steps", "2", "--batch-size", "4",
                 "--no-tensorboard", "-o", str(run)]) == 2  # the demo preset is for 1-channel images
    assert "images have 3 channels but the model expects 1" in capsys.readouterr().err
    config = tmp_path / "model.json"
    config.write_text(json.dumps({"in_channels": 3, "hidden": 8, "res_hidden": 4, "num_res_blocks": 1,
                                  "code_dim": 4, "downsample": 2, "codebook_size": 16}))
    assert main(["train", "--data", f"prepared:{out}", "--config", str(config), "--steps", "2",
                 "--batch-size", "4", "--no-tensorboard", "-o", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["data"] == f"prepared:{out}" and record["split"] == "test"
