"""Atomic writes (ssb.atomic): a file or directory appears whole or not at all; a failed write (a full disk) names
the path it was writing and leaves no temp behind."""

import errno
import filecmp
import os

import pytest

from ssb.stages import curate
from ssb.atomic import publishing, write_text, writing
from ssb.errors import SsbError
from ssb.rows import append_rows, write_json, write_rows

from conftest import copy_taught


def _disk_full(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _leftovers(d):
    return sorted(p.name for p in d.rglob("*") if ".tmp" in p.name)


def test_a_written_file_replaces_the_old_one_whole(tmp_path):
    p = tmp_path / "a.txt"
    write_text(p, "old\n")
    with writing(p) as f:
        f.write("new\n")
        assert p.read_text() == "old\n"  # not visible before the block ends
    assert p.read_text() == "new\n"
    assert _leftovers(tmp_path) == []


def test_a_failed_block_leaves_the_old_file_and_no_temp(tmp_path):
    p = tmp_path / "a.txt"
    write_text(p, "old\n")
    with pytest.raises(ZeroDivisionError):
        with writing(p) as f:
            f.write("half")
            1 / 0
    assert p.read_text() == "old\n"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("name, write", [
    ("write_json", lambda p: write_json(p, {"a": 1})),
    ("write_rows", lambda p: write_rows(p, [{"a": 1}])),
    ("append_rows", lambda p: append_rows(p, [{"a": 1}])),
])
def test_a_full_disk_is_an_error_naming_the_file(tmp_path, monkeypatch, name, write):
    p = tmp_path / "rows.jsonl"
    p.write_text('{"a": 0}\n')
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(SsbError, match=f"cannot write {p}: No space left on device"):
        write(p)
    assert _leftovers(tmp_path) == []
    if name != "append_rows":  # an append may have reached the file (a torn line is dropped when it is read)
        assert p.read_text() == '{"a": 0}\n'


def test_a_published_directory_replaces_the_old_one_or_nothing(tmp_path):
    out = tmp_path / "adapter"
    with publishing(out) as tmp:
        (tmp / "w").write_text("1")
    assert (out / "w").read_text() == "1"
    with publishing(out) as tmp:
        (tmp / "w").write_text("2")
    assert (out / "w").read_text() == "2"
    with pytest.raises(SsbError, match=f"cannot write {out}: No space left on device"):
        with publishing(out) as tmp:
            (tmp / "w").write_text("3")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert (out / "w").read_text() == "2"
    assert _leftovers(tmp_path) == []


def test_a_stage_on_a_full_disk_names_its_file_cleans_up_and_reruns_identically(taught, tmp_path, monkeypatch):
    cfg, src = taught
    d = copy_taught(src, tmp_path / "run")
    for p in (d / "curate").iterdir():
        p.unlink()
    (d / "curate").rmdir()
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", _disk_full)
        with pytest.raises(SsbError, match=rf"cannot write {d / 'curate'}/\S+: No space left on device"):
            curate.run(cfg, d)
    assert _leftovers(d) == []
    curate.run(cfg, d)
    for name in ("pairs.jsonl", "graded.jsonl", "stats.json"):
        assert filecmp.cmp(d / "curate" / name, src / "curate" / name, shallow=False), name
