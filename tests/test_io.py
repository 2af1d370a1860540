"""The atomic write: a temporary file beside the target, renamed over it only once written whole."""

import errno
import os

import pytest

from ddpm.io import atomic_write


def test_the_content_lands_at_the_path_and_no_temporary_file_is_left(tmp_path):
    target = tmp_path / "new" / "folder" / "file.txt"  # the parent folders are created
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp.name == f".tmp-{os.getpid()}-file.txt"
        tmp.write_text("whole")
        assert not target.exists()  # nothing at the path before the rename
    assert target.read_text() == "whole"
    assert os.listdir(target.parent) == ["file.txt"]


def test_an_existing_file_is_replaced_whole(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old and longer")
    with atomic_write(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["file.txt"]


def test_a_failed_write_leaves_the_target_untouched_and_names_it(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with (
        pytest.raises(OSError, match=rf"\[Errno 28\] cannot write {target}: No space left on device") as info,
        atomic_write(target) as tmp,
    ):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.errno == errno.ENOSPC and isinstance(info.value.__cause__, OSError)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["file.txt"]


def test_an_unwritable_folder_is_an_error_naming_the_path(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    target = blocker / "file.txt"
    with pytest.raises(OSError, match=rf"cannot write {target}: "), atomic_write(target) as tmp:
        tmp.write_text("never")


def test_any_other_error_passes_unchanged_and_removes_the_temporary_file(tmp_path):
    target = tmp_path / "file.txt"
    with pytest.raises(ValueError, match="^bad data$"), atomic_write(target) as tmp:
        tmp.write_text("half")
        raise ValueError("bad data")
    assert os.listdir(tmp_path) == []
