"""MEMIT's update, written against the dual-system paper's equations 3–5.

Shapes: d_in is the down-projection's input width (the MLP's hidden size), d_out the model
width, N the number of key columns (new facts' renderings plus constrained keys).
Everything here is NumPy in float64 so that torch and MLX share one implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def inverse_covariance(c: np.ndarray, ridge: float = 1e-6) -> np.ndarray:
    """Ĉ⁻¹ of eq. 2's covariance, with a tiny ridge (relative to its trace) for conditioning."""
    c = np.asarray(c, dtype=np.float64)
    d = c.shape[0]
    c = c + ridge * np.trace(c) / d * np.eye(d)
    chol = np.linalg.cholesky(c)
    inv_chol = np.linalg.solve(chol, np.eye(d))
    return inv_chol.T @ inv_chol


def solve_update(keys: np.ndarray, c_inv: np.ndarray, lam: float) -> np.ndarray:
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
    k = np.asarray(keys, dtype=np.float64)
    c_inv_k = c_inv @ k  # (d_in × N)
    gram = lam * np.eye(k.shape[1]) + k.T @ c_inv_k  # λI + Kᵀ Ĉ⁻¹ K, (N × N)
    return np.linalg.solve(gram, c_inv_k.T)


def with_held_keys(new: np.ndarray, held: np.ndarray, lam: float, lam_hold: float) -> np.ndarray:
    """K of eq. 5: the new facts' key columns, then the held ones (both d_in × ·).

    Eq. 3 regularises every column of K alike, so the λ that keeps a new edit small also lets
    the held keys drift. Scaling the held columns by √(λ / lam_hold) weighs their zero
    residual as if it were solved with ``lam_hold`` instead: min ‖ΔW K_new − R‖² +
    (λ / lam_hold)‖ΔW K_held‖² + λ tr(ΔW Ĉ ΔWᵀ).
    """
    return np.concatenate([new, np.sqrt(lam / lam_hold) * held], axis=1)


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
    m: np.ndarray, residuals: np.ndarray, columns: Columns
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
    owner = np.asarray(columns.owner)
    factors = []
    for i in range(columns.n_memories):
        v = m[owner == i].sum(axis=0, keepdims=True)
        factors.append((residuals[i][:, None].astype(np.float32), v.astype(np.float32)))
    return factors


def spread(total: np.ndarray, layer_index: int, n_layers: int) -> np.ndarray:
    """The share of the remaining residual that layer ``layer_index`` (0-based) absorbs."""
    return total / (n_layers - layer_index)
