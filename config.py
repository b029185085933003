"""Baseline Informer on ETTh1, multivariate (M), 96 steps in, 96 out.

This file is data, not code: it is parsed with `ast` and never executed (see
nas_agent/config.py for what is allowed). The agent copies the best config it finds
over this file; earlier incumbents are kept under runs/incumbents/.
"""
import torch.nn as nn
import torch.optim as optim

data = {
    "path": "data/ETTh1.csv",  # or put the file in $NAS_DATA_DIR; ETTh1/ETTh2 download if missing
    "features": "M",  # all 7 columns in, all 7 out (the Informer paper's multivariate setting)
    "target": "OT",  # oil temperature, the ETT forecasting target
    "seq_len": 96,  # 4 days of hourly history
    "label_len": 48,  # known steps handed to the decoder as its start token
    "pred_len": 96,  # 4 days ahead
    "split": "auto",  # ETT files use the paper's fixed 12/4/4-month borders
    "split_ratios": [0.7, 0.1, 0.2],  # used only for non-ETT files
    "scale": True,  # standard scaler fitted on the training rows only
}

model = {
    "d_model": 256,  # half the paper's 512: a quarter of the attention cost, similar accuracy on ETTh1
    "n_heads": 4,  # 64 dims per head, as in the paper
    "e_layers": 3,  # with distilling: 96 -> 48 -> 24 tokens
    "d_layers": 1,
    "d_ff": 1024,  # 4 x d_model, the usual transformer ratio
    "dropout": 0.1,
    "factor": 5,  # ProbSparse sampling factor c: c*ln(L) queries get full attention
    "attn": "prob",  # ProbSparse; "full" for canonical attention
    "distil": True,  # halve the sequence between encoder layers
    "embed": "timeF",  # continuous time features; "fixed" or "learned" use calendar embeddings
    "activation": "gelu",
    "mix": True,  # mix heads in the decoder self-attention, as the paper's code did
    "revin": False,  # reversible instance norm: off for the baseline, a large gain on shifting series
}

training = {
    "optimizer_class": optim.Adam,
    "lr": 1e-4,  # the paper's rate
    "weight_decay": 1e-4,  # light L2: ETTh1 has only 8.6k training steps of history
    "optimizer_kwargs": {},
    "criterion_class": nn.MSELoss,  # the metric we report
    "criterion_kwargs": {},
    "scheduler_class": optim.lr_scheduler.CosineAnnealingLR,
    "scheduler_kwargs": {"T_max": 10},  # one cosine half-period over the usual early-stopped length
    "max_epochs": 20,
    "patience": 5,  # epochs without validation improvement before stopping
    "batch_size": 32,
    "seed": 2021,
    "grad_clip": None,  # the paper does not clip; set e.g. 1.0 for high learning rates
    "time_budget_s": None,  # wall-clock cap on training; set one (e.g. --set) for time-fair comparisons
    "max_steps_per_epoch": None,  # cap batches per epoch for quick searches; None = full epochs
    "amp": True,  # bf16 autocast where the device has native bf16 (CUDA, avx512_bf16 CPUs); eval stays fp32
}
