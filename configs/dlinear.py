"""DLinear (Zeng et al., "Are Transformers Effective for Time Series Forecasting?", AAAI 2023).

A moving-average (kernel 25) trend and the seasonal rest, each mapped to the horizon by one
linear layer over time shared by all channels (individual = False). ETTh1 settings: look-back
336, Adam at 0.005 halved every epoch, batch 32, 10 epochs with early stopping.
Published test MSE (ETTh1, 96 out): 0.384 with every test window scored (FITS re-run).
"""
import torch.nn as nn
import torch.optim as optim

data = {
    "path": "data/ETTh1.csv",
    "features": "M",
    "seq_len": 336,
    "label_len": 48,  # unused by the linear head
    "pred_len": 96,
}

model = {
    "head": "linear",
    "tokens": "time",
    "channels": "independent",
    "mixer": "none",
    "decomp": "moving_avg",
    "decomp_kernel": 25,
    "revin": False,
    "dropout": 0.0,
}

training = {
    "optimizer_class": optim.Adam,
    "lr": 0.005,
    "weight_decay": 0.0,
    "criterion_class": nn.MSELoss,
    "scheduler_class": optim.lr_scheduler.ExponentialLR,
    "scheduler_kwargs": {"gamma": 0.5},
    "max_epochs": 10,
    "patience": 3,
    "batch_size": 32,
}
