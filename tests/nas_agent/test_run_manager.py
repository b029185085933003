"""Run folder naming and config snapshots."""
import pytest

from nas_agent.config import load_config, write_config
from nas_agent.run_manager import get_run_dir, next_run_id, run_id_for
from tests.conftest import ROOT


def test_ids_count_from_known_ids_and_folders(tmp_path):
    assert run_id_for(7) == "run_0007"
    assert next_run_id(tmp_path) == "run_0000"
    (tmp_path / "run_0003").mkdir()
    (tmp_path / "run_0001.txt").write_text("not a run folder")
    assert next_run_id(tmp_path) == "run_0004"
    assert next_run_id(tmp_path, ["run_0009", "junk"]) == "run_0010"


def test_run_dir_rejects_path_tricks(tmp_path):
    assert get_run_dir("run_0002", tmp_path, create=False) == tmp_path / "run_0002"
    assert not (tmp_path / "run_0002").exists()
    for bad in ("../run_0001", "run_1", "run_0001/..", "x", tmp_path):
        with pytest.raises(ValueError, match="bad run id"):
            get_run_dir(bad, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_written_config_is_loadable(tmp_path):
    cfg = load_config(ROOT / "config.py", ["training.lr=0.003"])
    path = write_config(cfg, tmp_path / "config_used.py", header="snapshot")
    assert load_config(path) == cfg and path.read_text().startswith("# snapshot")


def test_readme_run_manager_snippet_in_a_fresh_directory(tmp_path, monkeypatch):
    """The README's example, as written: the run folder is made under ./runs, the config copied as is."""
    from tests.conftest import README_CONFIG

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.py").write_text(README_CONFIG)
    from pathlib import Path
    from nas_agent import get_run_dir, snapshot_config

    run_dir = get_run_dir("run_0000")
    snapshot_config(Path("config.py"), run_dir)

    assert run_dir == Path("runs/run_0000") and (tmp_path / "runs" / "run_0000").is_dir()
    assert (tmp_path / "runs" / "run_0000" / "config_used.py").read_text() == README_CONFIG
    assert load_config(run_dir / "config_used.py") == load_config(tmp_path / "config.py")
