"""Continual-learning metrics: pure functions of the accuracy matrix.

`R[i, j]` is the accuracy (a fraction in [0, 1]) on task j's test set after training
task i, for a stream of T tasks; `b[j]` is the accuracy of the untrained model on task j.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def _matrix(R) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"the accuracy matrix must be square T x T, got shape {R.shape}")
    return R


def average_accuracy(R) -> float:
    """ACC = mean_j R[T-1, j]: accuracy on all tasks after the last one."""
    R = _matrix(R)
    return float(R[-1].mean())


def backward_transfer(R) -> float:
    """BWT = mean_{j<T-1} (R[T-1, j] - R[j, j]) (Lopez-Paz & Ranzato 2017, GEM, Eq. 3).

    Negative values are forgetting. Undefined (nan) for a single task.
    """
    R = _matrix(R)
    T = R.shape[0]
    if T < 2:
        return float("nan")
    return float(np.mean([R[T - 1, j] - R[j, j] for j in range(T - 1)]))


def forward_transfer(R, b: Sequence[float]) -> float:
    """FWT = mean_{j>0} (R[j-1, j] - b[j]) (Lopez-Paz & Ranzato 2017, Eq. 4).

    `b` is the random-init accuracy on each task. Undefined (nan) for a single task.
    """
    R = _matrix(R)
    b = np.asarray(b, dtype=float)
    T = R.shape[0]
    if b.shape != (T,):
        raise ValueError(f"the random-init row must have {T} entries, got {b.shape}")
    if T < 2:
        return float("nan")
    return float(np.mean([R[j - 1, j] - b[j] for j in range(1, T)]))


def forgetting(R) -> float:
    """F = mean_{j<T-1} max_{l<T-1} (R[l, j] - R[T-1, j]) (Chaudhry et al. 2018, RWalk, Eq. 7-8).

    The max runs over every earlier evaluation l < T-1, as in the paper's definition
    (rows before j was learned are typically at chance and do not win the max).
    """
    R = _matrix(R)
    T = R.shape[0]
    if T < 2:
        return float("nan")
    return float(np.mean([np.max(R[: T - 1, j] - R[T - 1, j]) for j in range(T - 1)]))


def average_incremental_accuracy(R) -> float:
    """mean_i (mean_{j<=i} R[i, j]) (Rebuffi et al. 2017, iCaRL, Sec. 4)."""
    R = _matrix(R)
    return float(np.mean([R[i, : i + 1].mean() for i in range(R.shape[0])]))


def all_metrics(R, b: Optional[Sequence[float]] = None) -> dict[str, float]:
    out = {
        "acc": average_accuracy(R),
        "bwt": backward_transfer(R),
        "forgetting": forgetting(R),
        "avg_inc_acc": average_incremental_accuracy(R),
    }
    out["fwt"] = forward_transfer(R, b) if b is not None else float("nan")
    return out


def learning_accuracy(R) -> float:
    """LA = mean_k R[k, k]: accuracy on each task right after learning it (the "learning
    accuracy" of Riemer et al. 2019, MER). It measures plasticity and, unlike FWT, is defined the
    same way in every scenario."""
    R = _matrix(R)
    return float(np.mean(np.diag(R)))


def transfer_vs_reference(R, R_ref) -> float:
    """mean_{k>0} (R[k, k] - R_ref[k, k]): how much better (or worse) a method learns each new
    task than a reference trained on the same stream and seed learns it.

    Lopez-Paz & Ranzato (2017, Eq. 4) measure forward transfer against the random-init
    accuracy b; Diaz-Rodriguez et al. (2018, "Don't forget, there is more than forgetting")
    discuss it and alternatives. Comparing with a reference run instead of b is the
    "learned after the earlier tasks vs. without them" view of forward transfer, e.g.
    Wolczyk et al. (2021, Continual World), whose reference is the task trained from
    scratch. Task 0 has nothing to transfer from and is left out; undefined (nan) for a
    single task.
    """
    R, R_ref = _matrix(R), _matrix(R_ref)
    if R.shape != R_ref.shape:
        raise ValueError(f"the matrices must have the same shape, got {R.shape} and {R_ref.shape}")
    if R.shape[0] < 2:
        return float("nan")
    return float(np.mean(np.diag(R)[1:] - np.diag(R_ref)[1:]))
