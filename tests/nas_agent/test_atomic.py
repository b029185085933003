"""Tests for nas_agent.atomic: atomic writes, strict JSON with NaN -> null, JSONL appends."""
import json
import os
from pathlib import Path

import pytest

from nas_agent import atomic
from nas_agent.atomic import append_jsonl, atomic_write_json, atomic_write_text, to_jsonable


def _temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_write_text_creates_and_replaces(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text(encoding="utf-8") == "two"
    assert _temp_files(tmp_path) == []


def test_write_text_keeps_backup_of_previous_version(tmp_path):
    target, bak = tmp_path / "s.json", tmp_path / "s.json.bak"
    atomic_write_text(target, "v1", backup_path=bak)
    assert not bak.exists()  # nothing to back up on the first write
    atomic_write_text(target, "v2", backup_path=bak)
    atomic_write_text(target, "v3", backup_path=bak)
    assert target.read_text(encoding="utf-8") == "v3"
    assert bak.read_text(encoding="utf-8") == "v2"
    assert _temp_files(tmp_path) == []


def test_backup_falls_back_to_copy_when_links_fail(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise PermissionError("links not supported here")

    monkeypatch.setattr(os, "link", no_link)
    target, bak = tmp_path / "s.json", tmp_path / "s.json.bak"
    atomic_write_text(target, "v1", backup_path=bak)
    atomic_write_text(target, "v2", backup_path=bak)
    assert bak.read_text(encoding="utf-8") == "v1"
    assert _temp_files(tmp_path) == []


def test_failed_replace_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")

    def boom(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_text(target, "new", backup_path=tmp_path / "a.txt.bak")
    monkeypatch.undo()
    assert target.read_text(encoding="utf-8") == "old"
    assert _temp_files(tmp_path) == []


def test_failed_temp_write_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"

    def bad_fsync(fd):
        raise OSError("fsync failed")

    monkeypatch.setattr(os, "fsync", bad_fsync)
    with pytest.raises(OSError, match="fsync failed"):
        atomic_write_text(target, "data")
    monkeypatch.undo()
    assert not target.exists()
    assert _temp_files(tmp_path) == []


def test_to_jsonable_maps_non_finite_to_none_recursively():
    obj = {"a": float("nan"), "b": [1.5, float("inf"), (float("-inf"), 2)], "c": {"d": None}}
    assert to_jsonable(obj) == {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": None}}
    assert to_jsonable(True) is True and to_jsonable("x") == "x"


def test_to_jsonable_names_location_of_bad_value():
    with pytest.raises(TypeError, match=r"\$\.runs\[1\]\.path: a value of type PosixPath"):
        to_jsonable({"runs": [{}, {"path": Path("/x")}]})


def test_atomic_write_json_is_strict_json_with_trailing_newline(tmp_path):
    target = tmp_path / "m.json"
    atomic_write_json(target, {"val_mse": float("nan"), "n": 3})
    text = target.read_text(encoding="utf-8")
    assert text.endswith("\n") and "NaN" not in text
    assert json.loads(text) == {"val_mse": None, "n": 3}


def test_append_jsonl_appends_lines(tmp_path):
    target = tmp_path / "samples.jsonl"
    append_jsonl(target, {"i": 1, "x": float("nan")})
    append_jsonl(target, {"i": 2})
    lines = target.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"i": 1, "x": None}, {"i": 2}]


def test_relative_path_in_current_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    atomic_write_text("rel.txt", "x", backup_path="rel.txt.bak")
    atomic_write_text("rel.txt", "y", backup_path="rel.txt.bak")
    assert Path("rel.txt").read_text(encoding="utf-8") == "y"
    assert atomic.dumps_json([1]).endswith("\n")


def test_append_after_a_torn_last_line_keeps_the_new_record(tmp_path):
    import json
    from nas_agent.atomic import append_jsonl
    path = tmp_path / "samples.jsonl"
    append_jsonl(path, {"a": 1})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"torn": tr')  # a crash mid-append
    append_jsonl(path, {"b": 2})
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"a": 1} and lines[1] == '{"torn": tr' and json.loads(lines[2]) == {"b": 2}
