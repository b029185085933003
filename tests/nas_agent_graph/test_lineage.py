"""The report's lineage tree (nas_agent_graph/lineage.py)."""
import copy
from html.parser import HTMLParser

from nas_agent.agent_state import AgentState, RunInfo, add_run
from nas_agent_graph.lineage import children, config_diff, lineage_html
from nas_agent_graph.report import write_report

BASE = {"data": {"seq_len": 96}, "model": {"d_model": 256, "revin": False}, "training": {"lr": 1e-4}}


def config(**changes) -> dict:
    out = copy.deepcopy(BASE)
    for path, value in changes.items():
        section, key = path.split("__")
        out[section][key] = value
    return out


def study() -> AgentState:
    state = AgentState(max_runs=6)
    runs = [("run_0000", None, 1.0, True, config(), "baseline"),
            ("run_0001", "run_0000", 1.1, False, config(model__d_model=128), "tpe"),
            ("run_0002", "run_0000", 0.8, True, config(model__revin=True), "archetype"),
            ("run_0003", "run_0002", None, False, config(model__revin=True, training__lr=1e-2), "tpe"),
            ("run_0004", "run_0002", 0.7, True, config(model__revin=True, data__seq_len=336), "hybrid"),
            ("run_0005", "run_0004", 0.71, False, config(model__revin=True, data__seq_len=336), "confirm")]
    for run_id, parent, val, accepted, cfg, proposer in runs:
        add_run(state, RunInfo(run_id=run_id, parent_run_id=parent, val_mse=val, accepted=accepted, config=cfg,
                               proposer=proposer, status="ok" if val else "diverged"))
    return state


class Tree(HTMLParser):
    """Each run id with its depth in the nested lists."""

    def __init__(self):
        super().__init__()
        self.depth, self.nodes, self.in_summary = 0, [], False

    def handle_starttag(self, tag, attrs):
        self.depth += tag == "ul"
        self.in_summary |= tag == "summary"

    def handle_endtag(self, tag):
        self.depth -= tag == "ul"
        self.in_summary &= tag != "summary"

    def handle_data(self, data):
        if self.in_summary and data.startswith("run_"):
            self.nodes.append((data.split()[0], self.depth))


def test_runs_hang_from_their_parents_with_incumbents_marked():
    state = study()
    assert [r.run_id for r in children(state)[None]] == ["run_0000"]
    assert [r.run_id for r in children(state)["run_0002"]] == ["run_0003", "run_0004"]
    page = lineage_html(state)
    tree = Tree()
    tree.feed(page)
    assert tree.nodes == [("run_0000", 1), ("run_0001", 2), ("run_0002", 2), ("run_0003", 3), ("run_0004", 3),
                          ("run_0005", 4)]
    assert "run_0004 ★" in page and "run_0002 ✓" in page and "3 change(s)" in page
    assert '<span class="fail">run_0003</span>' in page


def test_a_node_opens_the_settings_it_changed_from_its_parent():
    state = study()
    assert config_diff(state.runs[4].config, state.runs[2].config) == [("data.seq_len", 96, 336)]
    page = lineage_html(state)
    assert "<code>data.seq_len</code></td><td>96</td><td>→ 336</td>" in page
    assert 'title="1 setting(s) changed from run_0002"' in page  # run_0003: revin is its parent's already
    assert "same config as its parent" in page  # the confirmation run


def test_the_report_holds_the_lineage(tmp_path):
    out = write_report(study(), tmp_path / "runs")
    text = out.read_text()
    assert '<h2 id="lineage">Lineage</h2>' in text and ".lineage ul" in text and "<script" not in text
