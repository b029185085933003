"""Tests for nas_agent_graph.report: the status table and the offline HTML report."""
import base64
import io
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from rich.console import Console

from nas_agent.agent_state import AgentState, RunInfo, add_rejected, add_run
from nas_agent.config import parse_config_source, render_config
from nas_agent.logging_utils import HISTORY_FILE, save_history, save_metrics
from nas_agent_graph.report import (
    BEST_MARK, KEY_PARAMS, compact_params, format_duration, format_sci, param_value,
    render_status, status_table, varying_params, write_report,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ANSI = re.compile(r"\x1b\[")

# (status, val_mse, test_mse, accepted, config changes, error_tail, epochs in history.json)
RUN_SPECS = [
    ("ok", 0.52, 0.48, True, {}, None, 6),
    ("ok", 0.61, 0.55, False, {"model.attn": "full"}, None, 5),
    ("ok", 0.47, 0.44, True, {"model.revin": True}, None, 8),
    ("failed", None, None, False, {"model.d_model": 1024},
     "Traceback (most recent call last):\n  ...\ntorch.OutOfMemoryError: CUDA out of memory\n", 0),
    ("diverged", None, None, False, {"training.lr": 1e-2}, "val_mse became NaN at epoch 2", 2),
    ("timeout", 0.50, 0.47, False, {"model.e_layers": 4, "data.seq_len": 192}, None, 3),
    ("ok", 0.41, 0.39, True, {"model.revin": True, "training.lr": 3e-4,
                              "training.optimizer_class": "optim.AdamW"}, None, 10),
    ("pruned", 0.70, None, False, {"training.batch_size": 64}, None, 2),
    ("interrupted", 0.58, None, False, {"model.n_heads": 8, "training.lr": 1e-5}, None, 1),
    ("ok", 0.44, 0.42, False, {"model.revin": True, "model.d_model": 128}, None, 7),
]
BEST = "run_0006"


def _base_config() -> dict:
    """The project's baseline config.py as a plain dict, as the agent stores it."""
    with open(REPO_ROOT / "config.py", encoding="utf-8") as f:
        return parse_config_source(f.read(), "config.py")


def _config(changes: dict) -> dict:
    config = _base_config()
    for path, value in changes.items():
        section, key = path.split(".")
        config[section][key] = value
    return config


def _history(epochs: int, final: float | None, diverged: bool) -> list[dict]:
    """Plausible per-epoch records ending near `final` (NaN val_mse for a diverged run)."""
    records = []
    for e in range(1, epochs + 1):
        val = (final or 0.6) * (1 + 0.5 / e)
        if diverged and e == epochs:
            val = float("nan")
        records.append({"epoch": e, "train_loss": val * 0.9, "train_mse": val * 0.9,
                        "val_mse": val, "val_mae": val ** 0.5, "lr": 1e-4,
                        "epoch_time_s": 12.0})
    return records


def _make_study(runs_dir: Path) -> AgentState:
    """A 10-run study with real run folders: mixed statuses, 3 accepted, 2 rejected proposals."""
    state = AgentState(max_runs=12, meta={"seed": 0, "proposer": "llm", "dataset": "ETTh1"})
    for i, (status, val, test, accepted, changes, error, epochs) in enumerate(RUN_SPECS):
        run_id = f"run_{i:04d}"
        config = _config(changes)
        run_dir = runs_dir / run_id
        run_dir.mkdir(parents=True)
        with open(run_dir / "config_used.py", "w", encoding="utf-8") as f:
            f.write(render_config(config))
        if epochs:
            save_history(run_dir, _history(epochs, val, status == "diverged"))
        save_metrics(run_dir, {"status": status, "val_mse": val, "test_mse": test,
                               "error": error})
        add_run(state, RunInfo(
            run_id=run_id, status=status, val_mse=val, val_mae=None, test_mse=test,
            test_mae=None, history_summary=f"{epochs} epochs", accepted=accepted,
            reason="new best" if accepted else "not better than the best run",
            proposer="baseline" if i == 0 else "llm", config=config,
            parent_run_id=None if i == 0 else "run_0000",
            started_at="2025-01-31T12:00:00+00:00", duration_s=30.0 + 37 * i,
            error_tail=error))
    add_rejected(state, attempt=3, proposer="llm", config={"model": {"d_model": 250}},
                 error="model: d_model must be divisible by n_heads <script>")
    add_rejected(state, attempt=7, proposer="llm", config={}, error="training.lr: expected > 0")
    assert state.best_run_id == BEST
    return state


@pytest.fixture
def study(tmp_path):
    runs_dir = tmp_path / "runs"
    return _make_study(runs_dir), runs_dir


class _PageParser(HTMLParser):
    """Collects images, links and the runs table's body rows; checks that tags nest."""
    VOID = {"meta", "img", "br", "hr", "link", "input", "col", "source", "wbr"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.images, self.urls = [], [], [], []
        self.in_runs = self.in_tbody = False
        self.run_rows = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for name in ("src", "href"):
            if name in attrs and re.match(r"\s*(https?:)?//", attrs[name] or ""):
                self.urls.append(attrs[name])
        if tag == "table" and attrs.get("id") == "runs":
            self.in_runs = True
        if tag == "tbody" and self.in_runs:
            self.in_tbody = True
        if tag == "tr" and self.in_tbody:
            self.run_rows += 1
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open tags {self.stack[-3:]}")
            return
        self.stack.pop()
        if tag == "tbody":
            self.in_tbody = False
        if tag == "table":
            self.in_runs = False


def _parse(path: Path) -> tuple[str, _PageParser]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    parser = _PageParser()
    parser.feed(text)
    parser.close()
    assert not parser.errors, parser.errors
    assert not parser.stack, f"unclosed tags: {parser.stack}"
    return text, parser


def _decode_png(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    data = base64.b64decode(src[len(prefix):], validate=True)
    assert data.startswith(PNG_SIGNATURE)
    return data


def _assert_readable_png(data: bytes) -> None:
    import matplotlib.image as mpimg

    pixels = mpimg.imread(io.BytesIO(data), format="png")
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(io.BytesIO(data)) as image:
        image.verify()


# --------------------------------------------------------------------------- HTML report

def test_report_is_valid_offline_html_with_embedded_pngs(study):
    state, runs_dir = study
    out = write_report(state, runs_dir, state_path=runs_dir.parent / "agent_state.json")
    assert out == runs_dir / "report.html" and out.is_file()
    text, page = _parse(out)
    assert page.run_rows == len(state.runs)
    assert "http://" not in text and "https://" not in text
    assert not page.urls
    assert len(page.images) >= 4
    for src in page.images:
        _assert_readable_png(_decode_png(src))
    assert out.stat().st_size < 1_500_000
    # header: best run, its scores and the re-run command; state file path
    assert f"--config {runs_dir / BEST / 'config_used.py'}" in text
    assert "0.4100" in text and "0.3900" in text
    assert "agent_state.json" in text
    # rejected proposals are listed and escaped
    assert "Rejected proposals (2)" in text
    assert "&lt;script&gt;" in text and "<script>" not in text
    # failed run: the error's last line, not the whole traceback
    assert "torch.OutOfMemoryError: CUDA out of memory" in text
    assert "most recent call last" not in text
    assert not list(runs_dir.glob(".*.tmp"))


def test_report_custom_out_path(study, tmp_path):
    state, runs_dir = study
    out = write_report(state, runs_dir, out=tmp_path / "elsewhere" / "r.html")
    assert out == tmp_path / "elsewhere" / "r.html" and out.is_file()
    assert not (runs_dir / "report.html").exists()


def test_report_survives_missing_and_corrupt_history(study):
    state, runs_dir = study
    (runs_dir / BEST / HISTORY_FILE).unlink()          # the best run's curve is gone
    with open(runs_dir / "run_0009" / HISTORY_FILE, "w", encoding="utf-8") as f:
        f.write("{not json")                             # and one is corrupt
    text, page = _parse(write_report(state, runs_dir))
    assert page.run_rows == len(state.runs)
    assert len(page.images) >= 4
    assert BEST in text and "run_0009" in text


def test_report_without_any_history_still_writes(study):
    state, runs_dir = study
    for path in runs_dir.glob(f"*/{HISTORY_FILE}"):
        path.unlink()
    text, page = _parse(write_report(state, runs_dir))
    assert "No learning curves" in text
    assert page.run_rows == len(state.runs) and len(page.images) >= 3


def test_report_empty_state(tmp_path):
    runs_dir = tmp_path / "runs"
    text, page = _parse(write_report(AgentState(max_runs=5), runs_dir))
    assert "No runs yet" in text
    assert page.images == [] and page.run_rows == 0


def test_report_rejects_a_folder_as_output(study):
    state, runs_dir = study
    with pytest.raises(IsADirectoryError, match="pass a file path"):
        write_report(state, runs_dir, out=runs_dir)


# --------------------------------------------------------------------------- status table

def test_status_text_lists_every_run_marks_best_and_is_plain(study):
    state, _ = study
    text = render_status(state)
    assert not ANSI.search(text)
    lines = text.splitlines()
    assert lines[0].startswith("10/12 runs") and f"best {BEST}" in lines[0]
    assert "2 rejected proposals" in lines[0]
    for run in state.runs:
        row = [line for line in lines if line.lstrip().startswith(run.run_id)]
        assert len(row) == 1, run.run_id
        assert (BEST_MARK in row[0]) == (run.run_id == BEST)
        assert run.status in row[0]
    best_row = next(line for line in lines if line.lstrip().startswith(BEST))
    assert "d256 h4 e3/1 prob revin+ AdamW lr3e-4 bs32 seq96" in best_row
    assert "0.4100" in best_row and "0.3900" in best_row
    failed_row = next(line for line in lines if line.lstrip().startswith("run_0003"))
    assert "—" in failed_row


def test_status_colours_on_a_terminal_console(study):
    state, _ = study
    console = Console(file=io.StringIO(), force_terminal=True, color_system="standard", width=200)
    assert ANSI.search(render_status(state, console))


def test_status_empty_state_message(tmp_path):
    path = tmp_path / "agent_state.json"
    assert render_status(AgentState(), state_path=path).strip() == f"no runs yet in {path}"


def test_status_table_has_one_row_per_run(study):
    state, _ = study
    table = status_table(state, width=150)
    assert table.row_count == len(state.runs)
    assert [c.header for c in table.columns][:3] == ["run", "status", "val MSE"]


# --------------------------------------------------------------------------- helpers

def test_param_value_and_compact_params():
    config = _base_config()
    assert param_value(config, "model.d_model") == 256
    assert param_value(config, "model.nope") is None
    assert param_value({}, "training.lr") is None
    with pytest.raises(ValueError, match="dotted path"):
        param_value(config, "model..d_model")
    assert all(param_value(config, p) is not None for p in KEY_PARAMS)
    assert compact_params(config) == "d256 h4 e3/1 prob revin- Adam lr1e-4 bs32 seq96"
    assert compact_params({"model": {"e_layers": 2}}) == "e2/?"
    assert compact_params({}) == ""


def test_formatting_helpers():
    assert format_duration(65) == "1m05s"
    assert format_duration(42.4) == "42s"
    assert format_duration(3725) == "1h02m"
    assert format_duration(None) == "—"
    assert format_sci(1e-4) == "1e-4" and format_sci(2.5e-4) == "2.5e-4"


def test_varying_params(study):
    state, _ = study
    varying = varying_params(state.runs)
    assert "training.lr" in varying and "model.revin" in varying
    assert "model.d_layers" not in varying


def test_import_does_not_load_matplotlib():
    code = "import sys, nas_agent_graph.report; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False"
