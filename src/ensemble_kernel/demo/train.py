"""Many small 1-D CNNs trained at once, in one batched computation.

G networks are stacked along the channel axis: each convolution is one grouped
convolution (groups=G) and the last layer one batched product, so a step trains every
network on its own minibatch. Each network has its own initialisation and its own data
order (both from its own seed); the loss is the sum of the networks' mean losses, so each
gradient is exactly its network's own, and AdamW, being element-wise, is G independent
optimisers.

Architecture (per network): conv(1->32, k5, s2) - ReLU - conv(32->32, k3, s2) - ReLU -
conv(32->32, k3, s2) - ReLU - flatten (the penultimate features) - linear(->10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["TrainConfig", "Ensemble", "init_ensemble", "train_ensemble", "predict"]

_CONVS = ((1, 32, 5), (32, 32, 3), (32, 32, 3))  # (in channels, out channels, kernel)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10  # passes over the training set, per network
    batch_size: int = 128  # examples per network per step
    lr: float = 1e-2  # AdamW learning rate
    weight_decay: float = 1e-2  # AdamW decoupled weight decay
    channels: int = 32  # width of every conv layer


@dataclass
class Ensemble:
    """Stacked parameters of G networks: conv weights (G*C, Cin, k), biases, head (G, F, K)."""

    params: dict[str, torch.Tensor]
    n_models: int
    seeds: tuple[int, ...]


def _conv_lengths(length: int) -> list[int]:
    out = []
    for _, _, k in _CONVS:
        length = (length + 2 * (k // 2) - k) // 2 + 1
        out.append(length)
    return out


def init_ensemble(seeds: list[int], length: int, n_classes: int, channels: int = 32) -> Ensemble:
    """PyTorch's default (Kaiming-uniform) initialisation, each network from its own seed."""
    per_model: list[dict[str, torch.Tensor]] = []
    features = channels * _conv_lengths(length)[-1]
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        p = {}
        for i, (cin, cout, k) in enumerate(_CONVS):
            cin = 1 if i == 0 else channels
            bound = 1 / math.sqrt(cin * k)
            p[f"w{i}"] = (torch.rand(channels, cin, k, generator=g) * 2 - 1) * bound
            p[f"b{i}"] = (torch.rand(channels, generator=g) * 2 - 1) * bound
        bound = 1 / math.sqrt(features)
        p["w_out"] = (torch.rand(features, n_classes, generator=g) * 2 - 1) * bound
        p["b_out"] = (torch.rand(n_classes, generator=g) * 2 - 1) * bound
        per_model.append(p)
    stacked = {}
    for name in per_model[0]:
        parts = [p[name] for p in per_model]
        stacked[name] = (torch.cat(parts) if name.startswith(("w", "b")) and name[-1].isdigit()
                         else torch.stack(parts))
    return Ensemble(stacked, len(seeds), tuple(seeds))


def forward(params: dict[str, torch.Tensor], x: torch.Tensor, n_models: int):
    """Logits and penultimate features of every network.

    Parameters
    ----------
    x : Tensor of shape (batch, n_models, length): network g reads x[:, g].

    Returns
    -------
    (Tensor of shape (batch, n_models, n_classes), Tensor of shape (batch, n_models, features))
    """
    h = x
    for i, (_, _, k) in enumerate(_CONVS):
        h = F.relu(F.conv1d(h, params[f"w{i}"], params[f"b{i}"], stride=2, padding=k // 2,
                            groups=n_models))
    batch = h.shape[0]
    features = h.reshape(batch, n_models, -1)  # (batch, n_models, channels * length)
    logits = torch.einsum("bgf,gfo->bgo", features, params["w_out"]) + params["b_out"]
    return logits, features


def train_ensemble(ensemble: Ensemble, x: torch.Tensor, y: torch.Tensor, config: TrainConfig,
                   progress: Callable[[int, int], None] | None = None) -> Ensemble:
    """Train every network on (x, y) with its own data order; returns the trained ensemble.

    Parameters
    ----------
    x : Tensor of shape (n_examples, length). y : Tensor of shape (n_examples,), int64.
    """
    params = {k: v.clone().requires_grad_(True) for k, v in ensemble.params.items()}
    opt = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    n, g = len(x), ensemble.n_models
    steps_per_epoch = n // config.batch_size
    total = config.epochs * steps_per_epoch
    orders = [torch.Generator().manual_seed(s + 1_000_003) for s in ensemble.seeds]
    step = 0
    for _ in range(config.epochs):
        perm = torch.stack([torch.randperm(n, generator=o) for o in orders])  # (G, n)
        for s in range(steps_per_epoch):
            idx = perm[:, s * config.batch_size:(s + 1) * config.batch_size]  # (G, batch)
            xb = x[idx].permute(1, 0, 2)  # (batch, G, length)
            logits, _ = forward(params, xb, g)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[idx].T.reshape(-1),
                                   reduction="sum") / config.batch_size
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if progress is not None:
                progress(step, total)
    return Ensemble({k: v.detach() for k, v in params.items()}, g, ensemble.seeds)


@torch.no_grad()
def predict(ensemble: Ensemble, x: torch.Tensor, batch: int = 1000):
    """Logits of every network on every example, and their penultimate features.

    Returns
    -------
    (Tensor of shape (n_models, n_examples, n_classes), Tensor of shape
    (n_models, n_examples, features))
    """
    logits, features = [], []
    for b in range(0, len(x), batch):
        xb = x[b:b + batch].unsqueeze(1).expand(-1, ensemble.n_models, -1).contiguous()
        lo, fe = forward(ensemble.params, xb, ensemble.n_models)
        logits.append(lo)
        features.append(fe)
    return torch.cat(logits).permute(1, 0, 2), torch.cat(features).permute(1, 0, 2)
