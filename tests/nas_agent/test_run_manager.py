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
