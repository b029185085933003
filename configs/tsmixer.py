"""TSMixer (Chen et al., "TSMixer: An All-MLP Architecture for Time Series Forecasting",
TMLR 2023) on ETTh1.

One token per time step over a 512-step look-back; the raw features are mixed, with no
projection (raw_tokens); 6 blocks of a time-mixing MLP and a feature-mixing MLP (hidden 512),
each normalised over time and features (batch norm) with a residual; a linear map over time to
the horizon; RevIN. The paper's ETTh1 settings: Adam at 1e-4, dropout 0.9, batch 32, up to
100 epochs with patience 5. Published test MSE (ETTh1, 96 out): 0.361 (L=512).
"""
import torch.nn as nn
import torch.optim as optim

data = {
    "path": "data/ETTh1.csv",
    "features": "M",
    "seq_len": 512,
    "label_len": 48,  # unused by the linear head
    "pred_len": 96,
}

model = {
    "head": "linear",
    "tokens": "time",
    "channels": "mixed",
    "mixer": "mlp",
    "raw_tokens": True,
    "revin": True,
    "e_layers": 6,
    "d_ff": 512,
    "dropout": 0.9,
    "activation": "relu",
}

training = {
    "optimizer_class": optim.Adam,
    "lr": 1e-4,
    "weight_decay": 0.0,
    "criterion_class": nn.MSELoss,
    "scheduler_class": None,
    "scheduler_kwargs": {},
    "max_epochs": 100,
    "patience": 5,
    "batch_size": 32,
}
