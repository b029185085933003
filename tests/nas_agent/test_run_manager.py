"""Run folder naming and config snapshots."""
import pytest

from nas_agent.config import load_config
from nas_agent.run_manager import get_run_dir, next_run_id, run_id_for, snapshot_config
from tests.conftest import ROOT


def test_ids_count_from_known_ids_and_folders(tmp_path):
    assert run_id_for(7) == "run_0007"
    assert next_run_id(tmp_path) == "run_0000"
    (tmp_path / "run_0003").mkdir()
    (tmp_path / "run_0001.txt").write_text("not a run folder")
    assert next_run_id(tmp_path) == "run_0004"
    assert next_run_id(tmp_path, ["run_0009", "junk"]) == "run_0010"


def test_run_dir_rejects_path_tricks(tmp_path):
    assert get_run_dir(tmp_path, "run_0002") == tmp_path / "run_0002"
    for bad in ("../run_0001", "run_1", "run_0001/..", "x"):
        with pytest.raises(ValueError, match="bad run id"):
            get_run_dir(tmp_path, bad)


def test_snapshot_is_a_loadable_config(tmp_path):
    cfg = load_config(ROOT / "config.py", ["training.lr=0.003"])
    path = snapshot_config(cfg, tmp_path / "config_used.py", header="snapshot")
    assert load_config(path) == cfg and path.read_text().startswith("# snapshot")
