"""Informer (Zhou et al., AAAI 2021) at the paper's ETTh1 settings: multivariate, 96 in, 96 out.

The paper's repository defaults: d_model 512, 8 heads, 2 encoder layers, 1 decoder layer,
d_ff 2048, dropout 0.05, ProbSparse attention with factor 5, distilling, Adam at 1e-4 halved
every epoch, batch 32, 6 epochs with patience 3. Published test MSE 0.865 (L=96, drop_last).
"""
import torch.nn as nn
import torch.optim as optim

data = {
    "path": "data/ETTh1.csv",
    "features": "M",
    "seq_len": 96,
    "label_len": 48,
    "pred_len": 96,
}

model = {
    "head": "decoder",
    "d_model": 512,
    "n_heads": 8,
    "e_layers": 2,
    "d_layers": 1,
    "d_ff": 2048,
    "dropout": 0.05,
    "factor": 5,
    "attn": "prob",
    "distil": True,
    "embed": "timeF",
    "activation": "gelu",
    "mix": True,
}

training = {
    "optimizer_class": optim.Adam,
    "lr": 1e-4,
    "weight_decay": 0.0,
    "criterion_class": nn.MSELoss,
    "scheduler_class": optim.lr_scheduler.ExponentialLR,
    "scheduler_kwargs": {"gamma": 0.5},  # the paper's code halves the rate every epoch
    "max_epochs": 6,
    "patience": 3,
    "batch_size": 32,
}
