"""Reproduce the shipped configs' published ETTh1/ETTh2 numbers (issue 12, section 5).

    NAS_DATA_DIR=../shared/data python bench/reproduce.py [--configs dlinear itransformer]
        [--datasets ETTh1 ETTh2] [--seeds 3] [--out runs/reproduce] [--threads 1]
        [--set training.max_epochs=2 ...] [--write] [--report-only]

Trains each configs/<name>.py at its paper's settings on ETTh1 and ETTh2 (horizon 96, every
test window scored, scaler fitted on the training rows), one train.py subprocess per
(config, dataset, seed), one at a time (--jobs N: N at once), and prints test MSE/MAE as mean +- std over the seeds
next to the published numbers. A run whose metrics.json already holds status ok or timeout
is not trained again, so a killed benchmark resumes where it stopped. Every run is trained with
train.py --resume, so a run killed mid-training (no metrics.json, interrupted, or failed for a
passing reason such as missing data, with its resume state) continues after
its last completed epoch, to the result it would have had (a PatchTST run takes most of an hour
on a 2-core CPU: a session's end costs at most an epoch). Any other leftover (failed, diverged,
pruned) is trained again with --overwrite, and so is a run whose config_used.py no longer
matches the config (the config file changed since) and has no current record: the table never
mixes results of two versions of a config.

Each finished run also leaves a small record, bench/results/reproduce/<tag>.json (its metrics,
the config it trained, and model_py: the hash of the model file the run trained, as train.py
reports it in metrics.json; model.py's when the record was first written, for runs from before
train.py reported it): commit them. The table is built from the records and from --out, so runs made on other
machines and in earlier sessions count, and a fresh checkout does not train again what a record
already holds (for the config as it is now). --report-only also records a finished run it finds
in --out without one. A record whose config no longer matches the shipped file is stale, like a
run folder, and not counted. Runs with --set leave no records (they are not the papers' settings).

--set overrides are passed to every run. They make the runs deviate from the papers'
settings: their runs go to separate folders (a hash of the overrides in the tag) and the
table says so in bold. --report-only prints the table from the records and --out, training nothing.

It is a benchmark: it prints tables and asserts nothing about time.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from nas_agent.atomic import atomic_write_text, dumps_json
from nas_agent.config import ConfigError, load_config, validate_config
from nas_agent.run_folder import RESUMABLE_STATUSES, RESUME_FILE, SCORED
import train  # its resume-state check, so a state that train.py --resume refuses is trained afresh

CONFIGS = ["dlinear", "itransformer", "patchtst42", "tsmixer", "patchtst64", "informer"]
DATASETS = ["ETTh1", "ETTh2"]
SEED0 = 2021  # seeds are 2021, 2022, ... (2021 is the PatchTST/DLinear scripts' seed)
DONE = SCORED  # statuses that count as a finished run (timeout: best checkpoint tested)
DEFAULT_OUT = str(ROOT / "runs" / "reproduce")  # beside the checkout's own runs: kept across reboots
RESULTS_MD = ROOT / "bench" / "results" / "reproduce.md"
RECORDS = ROOT / "bench" / "results" / "reproduce"  # one <tag>.json per finished run (committed)
# device and amp (train.py's metrics.json): where the run trained, "cpu" or "cuda", and its autocast
# ("off", "bf16", "fp16"); None in records from before they were kept.
RECORD_KEYS = ("status", "test_mse", "test_mae", "val_mse", "train_time_sec", "epochs_run", "best_epoch",
               "device", "amp")

# Per-dataset settings of the papers' own scripts where they differ from the ETTh1 config.
# These are the papers' settings, not deviations.
PAPER_SETS: dict[tuple[str, str], list[str]] = {
    # thuml/iTransformer scripts/multivariate_forecasting/ETT/iTransformer_ETTh2.sh: d_model 128, d_ff 128
    # (ETTh1: 256/256, the config's values).
    ("itransformer", "ETTh2"): ["model.d_model=128", "model.d_ff=128"],
}

# Published test MSE / MAE at horizon 96, multivariate. Source: /work/shared/reference-results.md,
# checked against the sources it names. protocol "every window": every test window scored, as
# here; "drop_last": the Informer2020 test loader that drops the last partial batch (optimistic
# on ETTh1/ETTh2, so expect ours to be somewhat higher).
# mae None: the source gives no MAE under that protocol.
def _pub(L: int, mse: float, mae: float | None, protocol: str, source: str) -> dict:
    return {"L": L, "mse": mse, "mae": mae, "protocol": protocol, "source": source}


PUBLISHED: dict[tuple[str, str], dict] = {
    ("informer", "ETTh1"): _pub(L=96, mse=0.865, mae=0.713, protocol="drop_last",
                                source="Autoformer/TimesNet tables"),
    ("informer", "ETTh2"): _pub(L=96, mse=3.755, mae=1.525, protocol="drop_last",
                                source="iTransformer/TimesNet tables"),
    ("dlinear", "ETTh1"): _pub(L=336, mse=0.384, mae=None, protocol="every window",
                               source="FITS README (2023-12 re-run, drop_last fixed); paper 0.375/0.399 drop_last"),
    # FITS re-ran DLinear on ETTh2 at lr 0.005 (the config's rate); the DLinear paper's 0.289/0.353
    # used lr 0.05 and drop_last.
    ("dlinear", "ETTh2"): _pub(L=336, mse=0.282, mae=None, protocol="every window",
                               source="FITS README (re-run at lr 0.005); paper 0.289/0.353 drop_last"),
    ("patchtst42", "ETTh1"): _pub(L=336, mse=0.385, mae=None, protocol="every window",
                                  source="FITS README (re-run); paper 0.375/0.399 drop_last"),
    ("patchtst42", "ETTh2"): _pub(L=336, mse=0.274, mae=None, protocol="every window",
                                  source="FITS README (re-run); paper 0.274/0.336 drop_last"),
    ("patchtst64", "ETTh1"): _pub(L=512, mse=0.370, mae=0.400, protocol="drop_last", source="PatchTST paper"),
    ("itransformer", "ETTh1"): _pub(L=96, mse=0.386, mae=0.405, protocol="every window",
                                    source="iTransformer paper (test batch 1)"),
    ("itransformer", "ETTh2"): _pub(L=96, mse=0.297, mae=0.349, protocol="every window",
                                    source="iTransformer paper (test batch 1)"),
    # The authors' code (google-research tsmixer/tsmixer_basic) builds its test set with
    # tf.keras.utils.timeseries_dataset_from_array, stride 1 and no drop_remainder, from the last
    # seq_len rows of validation to the end of month 20, scales with a StandardScaler fit on the
    # training rows, and reports model.evaluate over it: every test window, as here.
    ("tsmixer", "ETTh1"): _pub(L=512, mse=0.361, mae=0.392, protocol="every window",
                               source="TSMixer paper; its code's test loader keeps every window"),
}
TOLERANCE = 0.05

# Why a row is (or was) off by more than 5%, with the evidence (findings of the runs in
# bench/results/reproduce.md; printed under the table for the rows shown).
NOTES: dict[tuple[str, str], str] = {
    ("dlinear", "ETTh2"): (
        "Seed noise, no settings mismatch found. Over 3 seeds 0.301 ± 0.018 (1.067x): seed 2023 "
        "early-stopped at its epoch-2 best on a noisy validation curve (0.322). Over 10 seeds "
        "(`--configs dlinear --seeds 10`) 0.2945 ± 0.0119 (1.044x; ETTh1 0.3749 ± 0.0058). The published "
        "0.282 is a single run (seed 2021) of the FITS re-run."),
    ("patchtst42", "ETTh1"): (
        "Since 2026-12-03 the config runs PatchTST as its authors' code does (yuqinie98/PatchTST): "
        "batch norm in the encoder (model.encoder_norm), residual attention (model.res_attention) and "
        "RevIN without learned weights (model.revin_affine false); with batch norm the validation MSE "
        "levels off within 20-30 epochs, and patience 10 stops the run (the layer-norm model trained all "
        "100). The earlier config (layer norm, affine RevIN, plain attention; records in "
        "bench/results/reproduce/superseded/) gave 0.3980 ± 0.0018 over 3 seeds of 100 epochs "
        "(1.034x of 0.385), val MSE 0.7217. Remaining differences: ExponentialLR(0.9) decays from "
        "epoch 1 (the authors' lradj type3 holds 1e-4 for 3 epochs) and patience is 10 (theirs 100). "
        "The runs of 2026-12-03 trained one thread each, two or three side by side on the 2-core AMD EPYC "
        "without avx512 (50-80 s per epoch). Seeds 2022 and 2023 were stopped (epochs 59 and 2) and "
        "resumed on 2026-12-03 with train.py --resume --model set to the model.py they started with "
        "(465ff4f; model.py changed since only in comments and a refactor checked bit for bit), which "
        "their records name (model_py). The 3 seeds stopped after 61-68 epochs."),
    ("patchtst42", "ETTh2"): (
        "The 1.060x of the earlier config was its encoder. With layer norm, affine RevIN and plain "
        "attention, 3 seeds of 100 epochs gave 0.2904 ± 0.0010 (records in "
        "bench/results/reproduce/superseded/). An ablation on seed 2021, 25 epochs each (`--configs "
        "patchtst42 --datasets ETTh2 --seeds 1 --set training.max_epochs=25`, plus the switches as "
        "--set): that model tested 0.2917 (val 0.2232), the authors' three switches together 0.2751 "
        "(val 0.2117). Batch norm alone (`--set model.encoder_norm=batch`, stopped after 5 epochs) "
        "followed the three switches' validation curve within 0.0004 (0.2648 / 0.2410 / 0.2291 / "
        "0.2211 / 0.2177 against 0.2649 / 0.2412 / 0.2291 / 0.2208 / 0.2173), while the old model "
        "stood at 0.2342 after 5 epochs: batch norm is the cause. With the switches the runs stop "
        "through patience 10 after 27-47 epochs, about 50 s each on one thread of this 2-core CPU."),
    ("patchtst64", "ETTh1"): (
        "Published only under drop_last (0.370); no every-window number is known, so the ratio is "
        "against a protocol that skips some of the test windows. With the authors' encoder (batch norm, "
        "residual attention, RevIN without weights) the validation MSE bottoms out at epochs 8-12 and "
        "patience 10 stops the runs at 18-22 epochs, 39-50 minutes each on one thread of this 2-core AMD "
        "EPYC without avx512, two runs side by side (100-150 s per epoch). Profiled (one thread, batch 128 "
        "x 7 channels), the attention over 64 patches takes most of a step: residual attention must "
        "materialise its [896, 4, 64, 64] scores, so its batched matmuls and softmax dominate. Seed 2023 "
        "was stopped after epoch 2 and resumed with the same model.py (2026-12-03)."),
    ("patchtst64", "ETTh2"): (
        "No published number under either protocol is in the project's reference list, so there is no "
        "ratio; PatchTST/42's every-window re-run on ETTh2 is 0.274 (this table's patchtst42 row: "
        "0.2767). Seeds 2021 and 2022 ran on model.py before residual attention used baddbmm, seed 2023 "
        "after it (069a6f6; the same values, the scale being 1/2): each trained beside an Informer run on "
        "the other core, seed 2022 at a median of about 96 s per epoch, seed 2023 at about 80 s. The "
        "runs stopped through patience 10 after 24, 22 and 53 epochs."),
    ("informer", "ETTh1"): (
        "Seed noise: 3 seeds tested 0.9937, 0.8367 and 0.9026 (0.911 +- 0.079), 1.053x the published "
        "0.865, a gap of 0.6 standard deviations of the seeds; the 0.865 is a single run of another code "
        "base (the Autoformer tables). Every seed's validation MSE was lowest after epoch 1 (1.0142, "
        "0.9559, 0.9604) and rose while its training MSE fell, so patience 3 stopped each after 4 of its 6 "
        "epochs and the epoch-1 weights were tested. The protocol is not the cause: Informer's test loader "
        "(batch 32, drop_last) leaves out 1 of the 2,785 windows. A paired run on seed 2021 (same "
        "initialisation and data order) with the ProbSparse attention of the Autoformer/Time-Series-Library "
        "Informer, the code behind the published 0.865 (sparsity measure over all sampled keys with no "
        "causal mask, no dropout on the sparse weights, the running sum rather than mean of V for lazy "
        "causal queries, encoder heads read as [B, L, H*E] without a transpose), reached val 0.9887 "
        "after epoch 1 against this model's 1.0142, a smaller change than the seed spread (0.9559 to "
        "1.0142); the session ended before it tested, so it was not landed. Settings of the other scripts: "
        "the Autoformer repo's Informer script uses factor 5 and dropout 0.05 (as here); "
        "Time-Series-Library's uses factor 3, dropout 0.1, 10 epochs, and with those (`--configs informer "
        "--seeds 3 --device cuda --set model.factor=3 --set model.dropout=0.1 --set training.max_epochs=10`, "
        "on an H200 with bf16 autocast, 2026-12-04) the 3 seeds tested 0.9427, 0.8882 and 0.8430 (0.891 +- "
        "0.050, 1.030x). Cost: 930-1150 s per epoch on one "
        "thread of this 2-core AMD EPYC without avx512, beside another run; 65-85 minutes per seed; "
        "matrix products take about 70% of a profiled step, so it is compute-bound."),
    ("tsmixer", "ETTh1"): (
        "Within 5% (1.013x). The 3 seeds tested 0.3686, 0.3641 and "
        "0.3647 and stopped through patience 5 after 35-48 epochs (best 30-43). The blocks mix the raw "
        "features with no input projection (model.raw_tokens) and normalise each (time, feature) cell over "
        "the batch, as the official TSMixer does (google-research tsmixer_rev_in, norm_type B); before "
        "raw_tokens, a projection to d_model 16 took the 0.9 dropout too and the model was far off (2 "
        "epochs: val 1.378, test 0.719). Remaining differences: torch BatchNorm's momentum and eps (0.1, "
        "1e-5; Keras 0.01 in torch terms, 1e-3). The runs trained on an H200 (the device tool, CUDA with "
        "bf16 autocast, 6 runs at once, 2026-12-04; train s/run is that GPU's): on one thread of this "
        "2-core AMD EPYC without avx512 an epoch takes 270-360 s, 3-4 hours a run, the feature MLP's "
        "[batch, 512, 512] hidden layer dominating (bench/results/train_speed.md). The device does not "
        "move the result: seed 2021 on this CPU in fp32 (amp off, no native bf16) reached val 1.1222 and "
        "0.9560 after epochs 1 and 2, the GPU run 1.1214 and 0.9526."),
    ("tsmixer", "ETTh2"): (
        "The project's reference list holds no TSMixer number for ETTh2, so there is no ratio. The 3 "
        "seeds tested 0.2952, 0.3048 and 0.2951 and stopped after 27-41 epochs; trained on the H200 as "
        "the ETTh1 row."),
    ("informer", "ETTh2"): (
        "Better than published, by seed noise: 3 seeds tested 3.198, 3.006 and 3.362 (3.188 +- 0.178, "
        "0.849x); the MAE, 1.483 +- 0.041, is 0.973x of the published 1.525. The 3.755 is a single run of "
        "Time-Series-Library's Informer (the iTransformer/TimesNet tables). Informer has no instance "
        "normalisation and ETTh2's test rows lie outside the range of its training rows, so a few large "
        "level errors dominate the MSE, which varies widely between seeds. With Time-Series-Library's "
        "settings (the ETTh1 note's command) the seeds tested 3.573, 3.134 and 3.330 (3.346 +- 0.220, "
        "0.891x): the published 3.755 lies 1.9 of those standard deviations above their mean. As on "
        "ETTh1, every seed's validation MSE was lowest after epoch 1 (1.113, 1.109, 1.243) and rose after "
        "while its training MSE fell, so patience 3 stopped each after 4 epochs. Trained on an H200 (the "
        "device tool, CUDA with bf16 autocast, 3 runs at once, about 50 s each, 2026-12-04); on one thread "
        "of this CPU an epoch takes about 930 s."),
    ("itransformer", "ETTh1"): (
        "Within 5% on both datasets. model.py's iTransformer omits the official one's 4 time-feature tokens "
        "(x_mark as extra variate tokens), its final encoder LayerNorm, and uses affine RevIN; "
        "the head applies dropout 0.1 (official none)."),
}


def tag_for(config: str, dataset: str, seed: int, sets: list[str]) -> str:
    tag = f"{config}_{dataset}_s{seed}"
    if sets:
        tag += "_set" + hashlib.sha1("\n".join(sets).encode()).hexdigest()[:8]
    return tag


def run_overrides(config: str, dataset: str, sets: list[str]) -> list[str]:
    data = [] if dataset == "ETTh1" else [f"data.path=data/{dataset}.csv"]
    return data + PAPER_SETS.get((config, dataset), []) + list(sets)


def read_metrics(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


FILLED_IN = ("enc_in", "dec_in", "c_out")  # set by train.py from the data


def current_config(config: str, dataset: str, seed: int, sets: list[str]):
    """The config the shipped file gives now for this run, as train.py loads it (--set, --seed)."""
    return load_config(ROOT / "configs" / f"{config}.py", run_overrides(config, dataset, sets) + [f"training.seed={seed}"])


def config_changes(run_dir: Path, config: str, dataset: str, seed: int, sets: list[str]) -> list[str]:
    """How the run's config_used.py differs from what the config gives now ([] if it does not)."""
    try:
        used = load_config(run_dir / "config_used.py").model_dump()
    except Exception as e:  # noqa: BLE001 - an unreadable record is a reason to train again
        return [f"config_used.py does not load ({type(e).__name__})"]
    return config_diff(used, current_config(config, dataset, seed, sets).model_dump())


def config_diff(used: dict, now: dict) -> list[str]:
    """The keys whose value differs ("section.key: used -> now"), the data-filled channels aside.
    Both are validated configs' dumps (a record's goes through the schema first, so a key added
    to the schema since, with its default, is not a change); compared as JSON, as records are."""
    used, now = json.loads(dumps_json(used)), json.loads(dumps_json(now))
    return [f"{section}.{key}: {used.get(section, {}).get(key)!r} -> {value!r}"
            for section, fields in now.items() for key, value in fields.items()
            if key not in FILLED_IN and used.get(section, {}).get(key) != value]


def make_record(run_dir: Path, m: dict, config: str, dataset: str, seed: int, sets: list[str]) -> dict:
    """The record of a finished run: what the table needs, and what decides whether it is stale."""
    return {"tag": run_dir.name, "config": config, "dataset": dataset, "seed": seed, "sets": list(sets),
            **{k: m.get(k) for k in RECORD_KEYS},
            "config_used": load_config(run_dir / "config_used.py").model_dump(),
            # the model file the run trained (train.py reports it; older runs did not: model.py now)
            "model_py": m.get("model_hash") or train.model_file_hash(str(ROOT / "model.py")),
            "recorded": _dt.datetime.now().isoformat(timespec="minutes"),
            "source": "a run folder of bench/reproduce.py (train.py metrics.json, config_used.py)"}


def save_record(records: Path, record: dict) -> None:
    """Write the record, unless the one there already says the same (its date aside: a report
    run again leaves the committed records as they are)."""
    path = records / f"{record['tag']}.json"
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    # model_py is the file when first recorded: a later edit of model.py does not rewrite it.
    same = lambda a: {k: v for k, v in json.loads(dumps_json(a)).items() if k not in ("recorded", "model_py")}  # noqa: E731
    if isinstance(old, dict) and same(old) == same(record):
        return
    records.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, dumps_json(record))


def load_record(records: Path, tag: str) -> dict | None:
    try:
        rec = json.loads((records / f"{tag}.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        print(f"[bad ] {records / tag}.json does not read ({e}); not counted (fix or delete it)", flush=True)
        return None
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if not (isinstance(rec, dict) and isinstance(rec.get("config_used"), dict) and rec.get("status") in DONE
            and all(number(rec.get(k)) for k in ("test_mse", "train_time_sec", "epochs_run"))):
        print(f"[bad ] {records / tag}.json is not a finished run's record (needs config_used, status ok or "
              f"timeout, and numbers for test_mse, train_time_sec and epochs_run); not counted (fix or delete it)",
              flush=True)
        return None
    return rec


def finished(config: str, dataset: str, seed: int, args) -> dict | None:
    """The metrics of a finished run of the config as it is now, else None: the run folder in
    --out (whose record it writes or refreshes), else the run's record in --records."""
    tag = tag_for(config, dataset, seed, args.set)
    run_dir = Path(args.out) / tag
    m = read_metrics(run_dir)
    if m and m.get("status") in DONE:
        changes = config_changes(run_dir, config, dataset, seed, args.set)
        if not changes:
            if not args.set:  # a deviation from the papers' settings is no result to keep
                save_record(Path(args.records), make_record(run_dir, m, config, dataset, seed, args.set))
            return m
        report_stale(run_dir.name, config, changes)
    record = load_record(Path(args.records), tag)
    if record is None:
        return None
    path = Path(args.records) / f"{tag}.json"
    try:
        used = validate_config(record["config_used"], where=f"{path} config_used").model_dump()
        changes = config_diff(used, current_config(config, dataset, seed, args.set).model_dump())
    except ConfigError as e:
        changes = [f"its config no longer validates: {e}"]
    if changes:
        report_stale(str(path), config, changes, fix=" (delete it, and the run is trained again)")
        return None
    return record


def report_stale(where: str, config: str, changes: list[str], fix: str = "") -> None:
    print(f"[stale] {where}: trained with another version of configs/{config}.py "
          f"({'; '.join(changes[:4])}); not counted{fix}", flush=True)


def restart_reason(run_dir: Path, config: str, dataset: str, seed: int, args) -> str | None:
    """Why an earlier attempt in run_dir cannot be continued (it ended without a result, or it
    trained another version of the config), or None: nothing there, or a resumable attempt."""
    if not run_dir.exists():
        return None
    if (run_dir / "config_used.py").exists():
        changes = config_changes(run_dir, config, dataset, seed, args.set)
        if changes:
            return f"it trained another version of configs/{config}.py ({'; '.join(changes[:4])})"
    if (run_dir / RESUME_FILE).is_file():
        # train.py --resume refuses a torn state, or one of another model.py (an edit since the run
        # started): left alone, every later invocation would be refused again.
        try:
            train.load_resume_state(run_dir, current_config(config, dataset, seed, args.set),
                                    train.model_file_hash(str(ROOT / "model.py")))
        except ConfigError as e:
            return f"its resume state cannot be continued ({e})"
    m = read_metrics(run_dir)
    if m is None and (run_dir / "metrics.json").exists():
        return "its metrics.json does not read"
    if m and m.get("status") != "interrupted" and not (
            m.get("status") in RESUMABLE_STATUSES and (run_dir / RESUME_FILE).is_file()):
        return f"it ended {m.get('status')}"
    return None


def train_one(config: str, dataset: str, seed: int, args) -> dict | None:
    """Run train.py for one (config, dataset, seed) unless a finished run is already there."""
    tag = tag_for(config, dataset, seed, args.set)
    run_dir = Path(args.out) / tag
    m = finished(config, dataset, seed, args)
    if m:
        print(f"[skip] {tag}: {m['status']} test_mse {m.get('test_mse')}", flush=True)
        return m
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / f"{config}.py"),
           "--tag", tag, "--runs-dir", str(args.out), "--seed", str(seed), "--device", args.device]
    for s in run_overrides(config, dataset, args.set):
        cmd += ["--set", s]
    cmd.append("--resume")  # continues a killed attempt; keeps a resume state for the next kill
    reason = restart_reason(run_dir, config, dataset, seed, args)
    if reason:
        print(f"[redo] {tag}: {reason}; trained from the start", flush=True)
        cmd.append("--overwrite")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    print(f"[run ] {tag}: {shlex.join(cmd[1:])}", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(Path(args.out) / f"{tag}.out", "a", encoding="utf-8") as log:  # a resumed run's log goes on
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    finished(config, dataset, seed, args)  # a finished run's record, written now: a session may end any time
    m = read_metrics(run_dir)
    status = m.get("status") if m else f"no metrics.json (exit {rc})"
    print(f"[done] {tag}: {status} test_mse {m.get('test_mse') if m else None} "
          f"epochs {m.get('epochs_run') if m else None} wall {time.monotonic() - t0:.0f}s", flush=True)
    return m


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def look_back(config: str, dataset: str, sets: list[str]) -> int | str:
    try:
        return load_config(ROOT / "configs" / f"{config}.py", run_overrides(config, dataset, sets)).data.seq_len
    except Exception:  # noqa: BLE001 - a table cell, not a failure
        return "?"


def device_cell(runs: list[dict]) -> str:
    """Where a row's runs trained ("cpu", "cuda", or both), from their records; records from
    before RECORD_KEYS held the device (all of them CPU runs) are counted as not recorded."""
    if not runs:
        return "–"
    devices = sorted({m["device"] for m in runs if m.get("device")})
    missing = sum(not m.get("device") for m in runs)
    cell = "+".join(devices)
    if missing:
        cell = (cell + ", " if cell else "") + ("not recorded" if missing == len(runs) else f"{missing} not recorded")
    return cell


def table(args) -> str:
    head = ("| config | data | L | seeds done | test MSE | test MAE | val MSE (mean) | published MSE / MAE "
            "(protocol) | ours / published | within 5% | train s/run | device | epochs (best) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    notes = []
    for config in args.configs:
        for dataset in args.datasets:
            runs = [finished(config, dataset, SEED0 + i, args) for i in range(args.seeds)]
            runs = [m for m in runs if m and m.get("test_mse") is not None]
            mse = [m["test_mse"] for m in runs]
            # A record rebuilt from a note may lack MAE or val MSE: those cells say over how many.
            mae = [m["test_mae"] for m in runs if m.get("test_mae") is not None]
            val = [m["val_mse"] for m in runs if m.get("val_mse") is not None]
            timeouts = sum(m["status"] == "timeout" for m in runs)
            pub = PUBLISHED.get((config, dataset))
            if pub:
                pub_cell = f"{pub['mse']:.3f} / {pub['mae']:.3f}" if pub["mae"] else f"{pub['mse']:.3f} / –"
                pub_cell += f" ({pub['protocol']})"
            else:
                pub_cell = "none"
            if pub and mse:
                ratio = statistics.mean(mse) / pub["mse"]
                ratio_cell = f"{ratio:.3f}"
                within = "yes" if abs(ratio - 1) <= TOLERANCE else "no"
                if pub["protocol"] != "every window":
                    within += f" ({pub['protocol']})"
            else:
                ratio_cell, within = "–", "n.a."
            train_s = f"{statistics.mean(m['train_time_sec'] for m in runs):.0f}" if runs else "–"
            epochs = (f"{statistics.mean(m['epochs_run'] for m in runs):.1f} "
                      f"({statistics.mean(m['best_epoch'] or 0 for m in runs):.1f})") if runs else "–"
            done = f"{len(runs)}/{args.seeds}" + (f" ({timeouts} timeout)" if timeouts else "")
            val_cell = f"{statistics.mean(val):.4f}" if val else "–"
            mae_cell = mean_std(mae)
            if len(mae) < len(mse) and mae:
                mae_cell += f" ({len(mae)} of {len(mse)})"
            if len(val) < len(mse) and val:
                val_cell += f" ({len(val)} of {len(mse)})"
            lines.append(f"| {config} | {dataset} | {look_back(config, dataset, args.set)} | {done} | "
                         f"{mean_std(mse)} | {mae_cell} | {val_cell} | {pub_cell} | {ratio_cell} | "
                         f"{within} | {train_s} | {device_cell(runs)} | {epochs} |")
            if pub:
                notes.append(f"- {config} / {dataset}: published L={pub['L']}, {pub['source']}.")
    out = "\n".join(lines)
    paper = [f"- {c} / {d}: paper setting {' '.join(s)}" for (c, d), s in PAPER_SETS.items()
             if c in args.configs and d in args.datasets]
    out += "\n\nPublished numbers:\n" + "\n".join(notes + paper)
    shown = [f"- {c} / {d}: {text}" for (c, d), text in NOTES.items() if c in args.configs and d in args.datasets]
    if shown:
        out += "\n\nNotes:\n" + "\n".join(shown)
    if args.set:
        out = (f"**Deviates from the papers' settings: every run had --set {' '.join(args.set)}**\n\n" + out)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=[c for c in CONFIGS], choices=CONFIGS)
    p.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    p.add_argument("--seeds", type=int, default=3, help=f"seeds {SEED0}, {SEED0 + 1}, ... (default 3)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"runs folder (default {DEFAULT_OUT})")
    p.add_argument("--records", default=str(RECORDS),
                   help=f"one JSON record per finished run, read and written (default {RECORDS.relative_to(ROOT)})")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each training (default 1)")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once (default 1)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to every train.py (deviates from the papers' settings; marked in the table)")
    p.add_argument("--write", action="store_true", help=f"also write the table to {RESULTS_MD.relative_to(ROOT)}")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing; tabulate the records and what is in --out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.environ.get("NAS_DATA_DIR"):
        print("warning: NAS_DATA_DIR is not set; train.py may try to download the data", file=sys.stderr)
    if not args.report_only:
        todo = [(config, dataset, SEED0 + i) for config in args.configs for dataset in args.datasets
                for i in range(args.seeds)]
        # --jobs N: N trainings at once, each with --threads threads (small models use two
        # single-thread processes on two cores better than one two-thread process).
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda job: train_one(*job, args), todo))
    text = table(args)
    print(text)
    if args.write:
        RESULTS_MD.parent.mkdir(parents=True, exist_ok=True)
        given = argv if argv is not None else sys.argv[1:]
        cmd = "python bench/reproduce.py " + shlex.join(given)
        rerun = "python bench/reproduce.py " + shlex.join(a for a in given if a != "--report-only")
        how = ("tabulated from the records and the runs already in --out" if args.report_only else
               f"OMP_NUM_THREADS={args.threads}, device {args.device}")
        RESULTS_MD.write_text(
            f"# Reproduction of published ETTh1/ETTh2 numbers (horizon 96, every test window scored)\n\n"
            f"Written {_dt.datetime.now().isoformat(timespec='minutes')} by `{cmd}` "
            f"({how}, seeds {SEED0}..{SEED0 + args.seeds - 1}; the train s/run of a row are those of the runs' "
            f"own threads and jobs, see the notes).\n"
            f"Reproduce (resumes; trains what is missing): `NAS_DATA_DIR=../shared/data {rerun}`\n\n"
            f"{text}\n", encoding="utf-8")
        print(f"wrote {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
