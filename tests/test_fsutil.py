import os
import stat

import pytest

from vqkit.fsutil import atomic_path, atomic_write_text


def test_atomic_write_gives_the_mode_of_an_ordinary_file(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "hello")
        (tmp_path / "b.txt").write_text("hello")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.txt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_content_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_folder_gives_the_mode_of_mkdir_and_replaces_whole(tmp_path):
    from vqkit.fsutil import atomic_folder

    old = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "model") as tmp:
            (tmp / "a").write_text("old")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "model", replace=True) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("killed")
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["a"] and (tmp_path / "model" / "a").read_text() == "old"
    with atomic_folder(tmp_path / "model", replace=True) as tmp:
        (tmp / "b").write_text("new")
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "plain"]  # no temporary left
