"""bench/search_compare.py's bookkeeping: which code each arm's study ran at."""
from __future__ import annotations

import subprocess

from tests.conftest import ROOT, load_bench_script

sc = load_bench_script("search_compare")


def test_a_study_keeps_the_commit_of_every_session_that_ran_it(tmp_path, monkeypatch):
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    assert sc.code_version().startswith(head.strip())
    assert sc.studied_code(tmp_path) == ["unrecorded"]  # a study from before the record
    monkeypatch.setattr(sc, "code_version", lambda: "aaaaaaa")
    assert sc.record_code_version(tmp_path) == ["aaaaaaa"]
    assert sc.record_code_version(tmp_path) == ["aaaaaaa"]  # resumed on the same code: once
    monkeypatch.setattr(sc, "code_version", lambda: "bbbbbbb+changes")
    assert sc.record_code_version(tmp_path) == ["aaaaaaa", "bbbbbbb+changes"]
    assert sc.studied_code(tmp_path) == ["aaaaaaa", "bbbbbbb+changes"]


def test_a_study_from_before_the_record_keeps_its_unrecorded_sessions(tmp_path, monkeypatch):
    (tmp_path / "agent_state.json").write_text("{}")  # a study that ran before code_versions.txt
    monkeypatch.setattr(sc, "code_version", lambda: "ccccccc")
    assert sc.record_code_version(tmp_path) == ["unrecorded", "ccccccc"]
