"""Behaviour tests for code sets: extraction, the on-disk format, atomicity and validation."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA

from vqkit.data.datasets import TensorImageSet, load_dataset, to_model
from vqkit.nn.vqvae import VQVAE, VQVAEConfig
from vqkit.runs.codes import CodeSet, CodeStoreError, code_dtype, extract_codes, load_codes

N = 37  # not a multiple of the batch size below, so the last batch is partial
BATCH = 8
K = 16
SOURCE = {"run": "runs/tiny", "step": 0, "fingerprint": "0" * 64, "data": DATA, "split": "test"}


@pytest.fixture(scope="module")
def dataset() -> TensorImageSet:
    test = load_dataset(DATA, "test")
    return TensorImageSet(DATA, test.images[:N], test.labels[:N], test.class_names)


@pytest.fixture(scope="module")
def model(dataset) -> VQVAE:
    torch.manual_seed(0)
    m = VQVAE(VQVAEConfig(in_channels=1, hidden=8, res_hidden=4, num_res_blocks=1, downsample=2,
                          code_dim=4, codebook_size=K, ema=False, kmeans_init=False,
                          restart_after=0))
    # Codebook entries drawn from the encoder's own outputs, so that many codes are used.
    with torch.no_grad():
        z_e = m.encoders[0](to_model(dataset.images)).permute(0, 2, 3, 1).reshape(-1, 4)
        m.quantizers[0].codebook.copy_(z_e[torch.randperm(len(z_e))[:K]])
    return m.eval()


@pytest.fixture(scope="module")
def stored(model, dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("codes") / "codes"
    extract_codes(model, dataset, out, batch_size=BATCH, progress=False, source=SOURCE)
    return out


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_round_trip_decodes_like_in_memory(model, dataset, stored):
    codes = load_codes(stored)
    assert isinstance(codes, CodeSet) and len(codes) == N
    assert isinstance(codes.codes, np.memmap) and codes.codes.dtype == np.uint16
    assert codes.codes.shape == (N, 7, 7) and codes.shape == (7, 7)
    x = to_model(dataset.images)
    [expected] = model.encode(x)
    assert len(torch.unique(expected)) > 1  # a meaningful comparison, not one repeated code
    loaded, labels = codes.batch(torch.arange(N))
    assert loaded.dtype == torch.int64 and labels.dtype == torch.int64
    assert torch.equal(loaded, expected)
    assert torch.equal(model.decode([loaded]), model.decode([expected]))
    assert torch.equal(labels, dataset.labels)


def test_load_without_mmap(stored):
    codes = load_codes(stored, mmap=False)
    assert not isinstance(codes.codes, np.memmap)
    assert np.array_equal(codes.codes, load_codes(stored).codes)


def test_batch_picks_rows(stored, dataset):
    codes = load_codes(stored)
    idx = torch.tensor([5, 0, 36, 5])
    maps, labels = codes.batch(idx)
    assert maps.shape == (4, 7, 7)
    assert torch.equal(maps, torch.from_numpy(codes.codes[[5, 0, 36, 5]].astype(np.int64)))
    assert torch.equal(labels, dataset.labels[idx])
    with pytest.raises(ValueError, match="1-D integer"):
        codes.batch(torch.tensor([0.0, 1.0]))


def test_manifest(stored):
    codes = load_codes(stored)
    m = json.loads((stored / "manifest.json").read_text())
    assert m == codes.manifest
    assert m["format_version"] == 1 and m["kind"] == "vqkit-codes"
    assert m["count"] == N and m["shape"] == [7, 7]
    assert m["codebook_size"] == K == codes.codebook_size and m["dtype"] == "uint16"
    assert m["image_size"] == [1, 28, 28]
    assert m["num_classes"] == 10 == codes.num_classes and m["class_names"][9] == "Ankle boot"
    assert m["source"] == SOURCE
    assert sorted(p.name for p in stored.iterdir()) == ["codes.npy", "labels.npy", "manifest.json"]
    assert _leftovers(stored.parent) == []


def test_limit_and_unlabelled_dataset(model, dataset, tmp_path):
    unlabelled = TensorImageSet("folder:x", dataset.images, torch.zeros(N, dtype=torch.int64), None)
    [codes] = extract_codes(model, unlabelled, tmp_path / "c", batch_size=BATCH, limit=10,
                            progress=False, source=SOURCE)
    assert len(codes) == 10 and codes.num_classes is None
    assert codes.manifest["class_names"] is None
    assert np.array_equal(codes.labels, np.full(10, -1))
    assert torch.equal(codes.batch(torch.arange(10))[0], model.encode(to_model(dataset.images[:10]))[0])


def test_flip_stores_the_codes_of_the_mirrored_images_after_the_originals(model, dataset, stored, tmp_path):
    [codes] = extract_codes(model, dataset, tmp_path / "f", batch_size=BATCH, flip=True, progress=False,
                            source=SOURCE)
    assert (len(codes), codes.images, codes.flipped) == (2 * N, N, True)
    maps, labels = codes.batch(torch.arange(2 * N))
    [mirrored] = model.encode(to_model(dataset.images.flip(-1)))
    assert not torch.equal(mirrored, maps[:N])  # the encoder's codes of the mirror, not a flipped map
    assert torch.equal(maps[:N], load_codes(stored).batch(torch.arange(N))[0])
    assert torch.equal(maps[N:], mirrored)
    assert torch.equal(labels, dataset.labels.repeat(2))
    assert codes.with_flips(torch.tensor([3, 0])).tolist() == [3, 0, N + 3, N]
    plain = load_codes(stored)
    assert (plain.images, plain.flipped) == (N, False) and plain.with_flips(torch.tensor([3])).tolist() == [3]


def test_a_flipped_manifest_must_hold_each_image_twice(model, dataset, tmp_path):
    extract_codes(model, dataset, tmp_path / "f", batch_size=BATCH, flip=True, progress=False, source=SOURCE)
    manifest = json.loads((tmp_path / "f" / "manifest.json").read_text())
    (tmp_path / "f" / "manifest.json").write_text(json.dumps({**manifest, "images": N + 1}))
    with pytest.raises(CodeStoreError, match="invalid or missing images"):
        load_codes(tmp_path / "f")


def test_code_dtype():
    assert code_dtype(65536) == np.uint16 and code_dtype(65537) == np.int32


def test_channel_mismatch_is_an_error_naming_the_data(model, tmp_path):
    rgb = TensorImageSet("cifar10:x", torch.zeros(2, 3, 28, 28, dtype=torch.uint8),
                         torch.zeros(2, dtype=torch.int64), ["a"])
    with pytest.raises(ValueError, match="cifar10:x"):
        extract_codes(model, rgb, tmp_path / "c", progress=False, source=SOURCE)
    assert not (tmp_path / "c").exists() and _leftovers(tmp_path) == []


def test_crash_mid_extraction_leaves_nothing_complete(model, dataset, tmp_path, monkeypatch):
    out = tmp_path / "codes"
    calls = []
    original = dataset.batch
    seen = {}

    def crashing(indices):
        calls.append(len(indices))
        if len(calls) == 2:
            # The state a SIGKILL here would leave: only a temporary folder, no manifest.
            (tmp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".codes.tmp-")]
            seen["tmp"] = tmp
            assert not out.exists() and not (tmp / "manifest.json").exists()
            with pytest.raises(CodeStoreError, match="manifest.json"):
                load_codes(tmp)
            raise RuntimeError("killed")
        return original(indices)

    monkeypatch.setattr(dataset, "batch", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        extract_codes(model, dataset, out, batch_size=BATCH, progress=False, source=SOURCE)
    assert calls == [BATCH, BATCH] and "tmp" in seen
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite(model, dataset, stored, tmp_path):
    out = tmp_path / "codes"
    shutil.copytree(stored, out)
    before = (out / "codes.npy").read_bytes()
    with pytest.raises(CodeStoreError, match=re.escape(str(out))) as e:
        extract_codes(model, dataset, out, limit=3, progress=False, source=SOURCE)
    assert "overwrite" in str(e.value)
    assert (out / "codes.npy").read_bytes() == before and _leftovers(tmp_path) == []

    [codes] = extract_codes(model, dataset, out, limit=3, overwrite=True, progress=False, source=SOURCE)
    assert len(codes) == 3 and len(load_codes(out)) == 3
    assert _leftovers(tmp_path) == []


def test_overwrite_never_replaces_a_folder_that_is_not_a_code_set(model, dataset, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(CodeStoreError, match="not a vqkit code set"):
        extract_codes(model, dataset, out, limit=3, overwrite=True, progress=False, source=SOURCE)
    assert (out / "keep.txt").read_text() == "precious" and _leftovers(tmp_path) == []


def test_source_must_be_json_before_any_work(model, dataset, tmp_path):
    with pytest.raises(TypeError):
        extract_codes(model, dataset, tmp_path / "c", progress=False, source={"run": object()})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Corrupt code sets: CodeStoreError naming the file


def _edit_manifest(**changes):
    def edit(folder: Path) -> None:
        m = json.loads((folder / "manifest.json").read_text())
        m.update(changes)
        (folder / "manifest.json").write_text(json.dumps(m))
    return edit


def _save(name: str, array: np.ndarray):
    def edit(folder: Path) -> None:
        np.save(folder / name, array, allow_pickle=array.dtype == object)
    return edit


def _out_of_range(folder: Path) -> None:
    codes = np.load(folder / "codes.npy")
    codes[20, 3, 4] = K
    np.save(folder / "codes.npy", codes)


def _npz_as_codes(folder: Path) -> None:
    np.savez(folder / "archive.npz", codes=np.zeros((N, 7, 7), np.uint16))
    (folder / "archive.npz").replace(folder / "codes.npy")


def _truncate(name: str):
    def edit(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    return edit


CORRUPTIONS = {
    "no manifest": ("manifest.json", lambda f: (f / "manifest.json").unlink(), "missing"),
    "manifest not JSON": ("manifest.json", lambda f: (f / "manifest.json").write_text("{oops"), "JSON"),
    "wrong kind": ("manifest.json", _edit_manifest(kind="vqvae"), "kind"),
    "wrong version": ("manifest.json", _edit_manifest(format_version=99), "version 99"),
    "bad shape field": ("manifest.json", _edit_manifest(shape=[7]), "shape"),
    "wrong dtype field": ("manifest.json", _edit_manifest(dtype="float32"), "dtype"),
    "count mismatch": ("codes.npy", _edit_manifest(count=N + 1, images=N + 1), "manifest"),
    "no codes": ("codes.npy", lambda f: (f / "codes.npy").unlink(), "missing"),
    "codes not npy": ("codes.npy", lambda f: (f / "codes.npy").write_text("1 2 3\n"), ".npy"),
    "codes npz": ("codes.npy", _npz_as_codes, ".npy"),
    "codes truncated": ("codes.npy", _truncate("codes.npy"), "codes.npy"),
    "codes wrong dtype": ("codes.npy", _save("codes.npy", np.zeros((N, 7, 7), np.int64)), "int64"),
    "codes wrong shape": ("codes.npy", _save("codes.npy", np.zeros((N, 7, 6), np.uint16)), "(37, 7, 6)"),
    "codes out of range": ("codes.npy", _out_of_range, "map 20"),
    "no labels": ("labels.npy", lambda f: (f / "labels.npy").unlink(), "missing"),
    "labels too short": ("labels.npy", _save("labels.npy", np.zeros(N - 1, np.int64)), "one label"),
    "labels out of range": ("labels.npy", _save("labels.npy", np.full(N, 10, np.int64)), "[0, 10)"),
    "labels pickled": ("labels.npy", _save("labels.npy", np.array([{"a": 1}] * N, dtype=object)), ""),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_code_set(case, stored, tmp_path):
    name, corrupt, needle = CORRUPTIONS[case]
    folder = tmp_path / "codes"
    shutil.copytree(stored, folder)
    corrupt(folder)
    with pytest.raises(CodeStoreError) as e:
        load_codes(folder)
    assert str(folder / name) in str(e.value) and needle in str(e.value)


def test_missing_folder(tmp_path):
    with pytest.raises(CodeStoreError, match="no such code set folder") as e:
        load_codes(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)


def test_pickled_codes_are_refused_without_unpickling(stored, tmp_path, monkeypatch):
    folder = tmp_path / "codes"
    shutil.copytree(stored, folder)
    np.save(folder / "codes.npy", np.array([{"a": 1}, [2, 3]], dtype=object))  # pickled by np.save

    def forbidden(*args, **kwargs):
        raise AssertionError("load_codes unpickled a file")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    for mmap in (True, False):
        with pytest.raises(CodeStoreError, match=re.escape(str(folder / "codes.npy"))):
            load_codes(folder, mmap=mmap)
