"""MEMIT's update, written against the dual-system paper's equations 3–5.

Shapes: d_in is the down-projection's input width (the MLP's hidden size), d_out the model
width, N the number of key columns (new facts' renderings plus constrained keys).
Everything here runs in float64 on the arrays a backend hands out (``Backend.to_device``):
NumPy on the CPU, so that torch and MLX share one implementation, or torch tensors on the GPU
that holds the layer, where the d_in × d_in products of a large model belong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# A float64 matrix: a NumPy array, or a torch tensor on the device of the layer it serves.
Array = Any


def inverse_covariance(
    c: Array,
    shrink: float = 0.0,
    ridge: float = 1e-6,
    priors: Sequence[tuple[Array, float]] = (),
) -> Array:
    """Ĉ⁻¹ of eq. 2's covariance, shrunk towards a multiple of the identity, with optional
    priors added.

    ``(1 − shrink)·Ĉ + shrink·(tr Ĉ / d)·I`` keeps the trace, so λ keeps its meaning. Ĉ is
    estimated from a few times d_in samples of the model's own text, which underestimates
    the variance of real text in Ĉ's weak directions; an edit solved against Ĉ alone leans
    into exactly those directions. A tiny ridge (relative to the trace) keeps it well
    conditioned.

    Each prior ``(P, w)`` is the second moment of keys in contexts an edit should leave alone
    (``covariance.PRIORS``: other people's names, the chat prompt), added scaled to ``w``
    times Ĉ's trace: eq. 3's regulariser then also counts an edit's reach into them, so the
    update leans on what is particular to its own keys.
    """
    lin = _lib(c)
    d = c.shape[0]
    eye = _eye(d, c)
    mean_var = float(lin.trace(c)) / d
    total = (1.0 - shrink) * c + (shrink + ridge) * mean_var * eye
    for prior, weight in priors:
        if weight:
            total = total + weight * (mean_var * d / float(lin.trace(prior))) * prior
    inv_chol = lin.linalg.solve(lin.linalg.cholesky(total), eye)
    return inv_chol.T @ inv_chol


def solve_update(keys: Array, c_inv: Array, lam: float) -> Array:
    """M with ΔW = R @ M for any residual R (d_out × N).

    Eq. 3: ΔW = R Kᵀ (K Kᵀ + λĈ)⁻¹. By Woodbury (eq. 4), equivalently
    ΔW = R (λI + Kᵀ Ĉ⁻¹ K)⁻¹ Kᵀ Ĉ⁻¹, so only an N × N system is solved.

    Args:
        keys: K, (d_in × N).
        c_inv: Ĉ⁻¹, (d_in × d_in).
        lam: λ.

    Returns:
        M, (N × d_in).
    """
    c_inv_k = c_inv @ keys  # (d_in × N)
    gram = lam * _eye(keys.shape[1], keys) + keys.T @ c_inv_k  # λI + Kᵀ Ĉ⁻¹ K, (N × N)
    return _lib(keys).linalg.solve(gram, c_inv_k.T)


def with_held_keys(new: Array, held: Array, lam: float, lam_hold: float) -> Array:
    """K of eq. 5: the new facts' key columns, then the held ones (both d_in × ·).

    Eq. 3 regularises every column of K alike, so the λ that keeps a new edit small also lets
    the held keys drift. Scaling the held columns by √(λ / lam_hold) weighs their zero
    residual as if it were solved with ``lam_hold`` instead: min ‖ΔW K_new − R‖² +
    (λ / lam_hold)‖ΔW K_held‖² + λ tr(ΔW Ĉ ΔWᵀ).
    """
    return _lib(new).concatenate([new, math.sqrt(lam / lam_hold) * held], axis=1)


def direct_update(keys: np.ndarray, residual: np.ndarray, c: np.ndarray, lam: float) -> np.ndarray:
    """Eq. 3 solved in d_in × d_in space; the reference the Woodbury form is tested against."""
    k = np.asarray(keys, dtype=np.float64)
    return np.linalg.solve((k @ k.T + lam * c).T, (residual @ k.T).T).T


@dataclass(frozen=True)
class Columns:
    """Which key columns belong to which new memory; the rest are constraints (eq. 5).

    Attributes:
        owner: For each column of K, the index of the new memory it belongs to, or -1 for a
            constraint column held at zero residual.
    """

    owner: tuple[int, ...]

    @property
    def n_memories(self) -> int:
        return max(self.owner, default=-1) + 1


def rank_one_factors(
    m: Array, residuals: np.ndarray, columns: Columns
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each new memory's share of ΔW = R M as rank-one factors (u, v) with ΔW_i = u @ v.

    A memory's columns all carry its residual r_i (constraint columns carry zero, eq. 5),
    so ΔW = Σ_i r_i (Σ_{c ∈ cols(i)} M_c) is a sum of rank-one terms, one per memory.

    Args:
        m: M from :func:`solve_update`, (N × d_in).
        residuals: r_i per new memory, (n_memories × d_out).
        columns: The owner of each column.

    Returns:
        ``[(u (d_out × 1), v (1 × d_in))]`` in memory order.
    """
    m = to_numpy(m)
    owner = np.asarray(columns.owner)
    factors = []
    for i in range(columns.n_memories):
        v = m[owner == i].sum(axis=0, keepdims=True)
        factors.append((residuals[i][:, None].astype(np.float32), v.astype(np.float32)))
    return factors


def spread(total: np.ndarray, layer_index: int, n_layers: int) -> np.ndarray:
    """The share of the remaining residual that layer ``layer_index`` (0-based) absorbs."""
    return total / (n_layers - layer_index)


def to_numpy(a: Array) -> np.ndarray:
    """``a`` as a NumPy array (copied off the GPU where it lives there)."""
    if isinstance(a, np.ndarray):
        return a
    return a.detach().cpu().numpy()


def _lib(a: Array):
    """The library whose functions apply to ``a``: NumPy, or torch for a tensor."""
    if isinstance(a, np.ndarray):
        return np
    import torch

    return torch


def _eye(n: int, like: Array) -> Array:
    if isinstance(like, np.ndarray):
        return np.eye(n, dtype=like.dtype)
    import torch

    return torch.eye(n, dtype=like.dtype, device=like.device)
