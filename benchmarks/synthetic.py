"""Synthetic logits with class structure, shared by the benchmarks that generate data.

Each example has a signal shared by every run: a random logit vector with its label's
logit raised by a random margin (0.5 to 6: some examples easy, some hard), so that
examples of one class, and above all examples with similar signals, are neighbours.
Each run adds its own noise (std 1.5). Float16, as the published logits are kept.
"""

from __future__ import annotations

import numpy as np


def class_signal(rng: np.random.Generator, n_examples: int,
                 n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels, shape (n_examples,), and the per-example signal, (n_examples, n_classes) float32."""
    labels = rng.integers(0, n_classes, n_examples)
    signal = rng.standard_normal((n_examples, n_classes)).astype(np.float32)
    signal[np.arange(n_examples), labels] += rng.uniform(0.5, 6.0, n_examples).astype(np.float32)
    return labels, signal


def noisy_runs(rng: np.random.Generator, signal: np.ndarray, n_runs: int,
               out: np.ndarray | None = None, block: int = 25) -> np.ndarray:
    """Runs of the signal plus noise, (n_runs, n_examples, n_classes) float16.

    Written `block` runs at a time into `out` (allocated if None), so that the float32
    temporaries stay at `block` runs whatever `n_runs` is.
    """
    if out is None:
        out = np.empty((n_runs, *signal.shape), dtype=np.float16)
    for m0 in range(0, n_runs, block):
        m1 = min(m0 + block, n_runs)
        noise = rng.standard_normal((m1 - m0, *signal.shape), dtype=np.float32)
        out[m0:m1] = (signal[None] + 1.5 * noise).astype(np.float16)
    return out
