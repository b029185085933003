"""Resource caps on the children (nas_agent_graph/limits.py), with real subprocesses: a model that
allocates past --run-memory is refused by the smoke test, a run that grows past it ends "failed"
with reason "memory cap (N GB)" and the next run proceeds, an honest model is unaffected."""
import subprocess
import sys
import time

import pytest

from nas_agent_graph.launcher import error_headline, launch_run
from nas_agent_graph.process import child_preexec
from nas_agent_graph.limits import (GB, Caps, CapError, cpu_cap_s, default_lora_memory_gb, default_run_memory_gb,
                                    parse_memory_gb, ran_out_of_memory)
from tests.conftest import PYTHON, ROOT, TINY_CONFIG, run_env

# build_model keeps 4 GB of tensors: the hostile file the static check lets through.
HOG = '''
import torch

def build_model(config):
    model = torch.nn.Linear(1, 1)
    model.keep = torch.ones(1024 ** 3)  # 4 GB of float32
    return model
'''

# An honest-looking model whose every forward keeps 128 MB more: the smoke test's one batch
# passes, training grows past the cap after a few steps.
LEAK = '''
import torch

KEPT = []

class Leaky(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.lin = torch.nn.Linear(config["model"]["enc_in"], config["model"]["c_out"])
        self.pred_len = config["data"]["pred_len"]

    def forward(self, x_enc, mark_enc, x_dec, mark_dec):
        KEPT.append(torch.ones(32 * 1024 ** 2))
        return self.lin(x_enc[:, -self.pred_len:, :])

def build_model(config):
    return Leaky(config)
'''


def cli(cwd, *args, timeout=120):
    return subprocess.run([PYTHON, "-m", "nas_agent_graph", *args], cwd=cwd, env=run_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "config.py").write_text(TINY_CONFIG)
    (tmp_path / "hog.py").write_text(HOG)
    (tmp_path / "leak.py").write_text(LEAK)
    return tmp_path


# --------------------------------------------------------------------------- the smoke test (check)

def test_check_refuses_a_model_allocating_past_the_cap_in_seconds(folder):
    start = time.monotonic()
    out = cli(folder, "check", "config.py", "--model", "hog.py", "--run-memory", "2")
    assert time.monotonic() - start < 30
    assert out.returncode == 1, out.stdout + out.stderr
    assert "REJECTED" in out.stdout and "exceeded its memory cap of 2 GB" in out.stdout


def test_check_passes_an_honest_model_under_the_cap(folder):
    out = cli(folder, "check", "config.py", "--model", str(ROOT / "model.py"), "--run-memory", "2")
    assert out.returncode == 0 and "OK:" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("value, message", [
    ("0", "must be a positive number of GB"),
    ("-1", "must be a positive number of GB"),
    ("lots", "expected a number of GB"),
    ("nan", "must be a positive number of GB"),
    ("100000", "more than this machine's"),
])
def test_bad_run_memory_values_are_usage_errors(folder, value, message):
    for args in (["check", "config.py"], ["--max-runs", "1", "--proposer", "random", "--warm-start", "off"]):
        out = cli(folder, *args, f"--run-memory={value}")
        assert out.returncode == 2, out.stdout + out.stderr
        assert f"error: --run-memory {value!r}: " in out.stderr and message in out.stderr
        assert "Traceback" not in out.stderr
    assert not (folder / "runs").exists()  # refused before anything was started


# --------------------------------------------------------------------------- train.py runs

@pytest.mark.slow  # ~23 s here
def test_a_run_growing_past_the_cap_fails_with_the_reason_and_the_next_run_proceeds(folder):
    runs = folder / "runs"
    caps = Caps(memory_gb=1.5, cpu_s=cpu_cap_s(None, 2))
    start = time.monotonic()
    leak = launch_run(runs / "run_0000", TINY_CONFIG, run_id="run_0000", runs_dir=runs, env=run_env(),
                      extra_args=["--model", str(folder / "leak.py")], caps=caps, timeout_s=300)
    assert time.monotonic() - start < 120
    assert leak.status == "failed"
    assert error_headline(leak.metrics["error"]).startswith("memory cap (1.5 GB): train.py ran out of memory")
    assert leak.metrics["failure"] == "memory cap" and leak.metrics["memory_cap_gb"] == 1.5
    assert "memory cap (1.5 GB)" in leak.error_tail.splitlines()[-1]  # the LLM's failure feedback
    honest = launch_run(runs / "run_0001", TINY_CONFIG, run_id="run_0001", runs_dir=runs, env=run_env(), caps=caps,
                        timeout_s=300)
    assert honest.status == "ok" and honest.metrics["val_mse"] is not None


def test_children_get_the_caps_and_are_the_oom_killers_first_pick():
    probe = ("import resource\n"
             "print(resource.getrlimit(resource.RLIMIT_DATA)[0], resource.getrlimit(resource.RLIMIT_CPU)[0])\n"
             "print(open('/proc/self/oom_score_adj').read().strip())\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                         preexec_fn=child_preexec(Caps(memory_gb=1.5, cpu_s=100)))
    data, cpu = map(int, out.stdout.split()[:2])
    assert data == int(1.5 * GB) and cpu == 100
    assert out.stdout.split()[2] == "1000"
    with open("/proc/self/oom_score_adj") as f:
        assert f.read().strip() != "1000"  # the orchestrator's own is left as it was


# --------------------------------------------------------------------------- defaults and parsing

def test_defaults_leave_room_for_the_orchestrator_and_split_by_parallel():
    assert default_run_memory_gb(1, available_gb=15.0) == 12.0
    assert default_run_memory_gb(4, available_gb=15.0) == 3.0
    assert default_run_memory_gb(8, available_gb=4.0) == 1.0  # never below MIN_DEFAULT_GB
    assert default_lora_memory_gb(3.0) == 10.0 and default_lora_memory_gb(12.0) == 12.0
    assert parse_memory_gb(None, "--run-memory", 7.0) == 7.0
    assert parse_memory_gb("off", "--run-memory", 7.0) is None
    assert parse_memory_gb("2.5", "--run-memory", 7.0, total_gb=16.0) == 2.5
    with pytest.raises(CapError, match="more than this machine's 16.0 GB"):
        parse_memory_gb("17", "--run-memory", 7.0, total_gb=16.0)
    assert ran_out_of_memory("RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried")
    assert ran_out_of_memory("terminate called after throwing an instance of 'std::bad_alloc'")
    assert not ran_out_of_memory("ValueError: loss is nan")


def test_a_model_allocating_past_the_cap_in_its_in_run_smoke_test_is_a_rejection_saying_so(folder):
    from nas_agent_graph.context import Context
    from nas_agent_graph.validation import labelled_smoke_error

    runs = folder / "runs"
    start = time.monotonic()
    hog = launch_run(runs / "run_0000", TINY_CONFIG, run_id="run_0000", runs_dir=runs, env=run_env(),
                     extra_args=["--model", str(folder / "hog.py"), "--smoke-test"],
                     caps=Caps(memory_gb=1.5, cpu_s=cpu_cap_s(None, 2)), timeout_s=300)
    assert time.monotonic() - start < 60
    assert hog.status == "invalid" and ran_out_of_memory(hog.metrics["error"]), hog.metrics["error"]
    message = labelled_smoke_error(hog.metrics["error"], Context(run_memory_gb=1.5))
    assert message.startswith("smoke test failed: the model exceeded its memory cap of 1.5 GB (--run-memory); "
                              "propose a smaller one. ")
    assert labelled_smoke_error("too many parameters: 9 > --max-params 1", Context(run_memory_gb=1.5)) == \
        "too many parameters: 9 > --max-params 1"
