"""Delta files: one memory's low-rank factors as safetensors, with metadata saying whose they are.

A file holds ``<name>.u`` (d_model × r) and ``<name>.v`` (r × d_ff), float32, for each edited
``down_proj`` weight ``<name>``, so that ΔW = u @ v; its metadata holds ``format``,
``memory_id``, the model's ``fingerprint`` and its name ``model`` (for messages; older files
lack it). Nothing here unpickles anything: safetensors holds only raw arrays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from sleeptui.backends import down_proj_name
from sleeptui.errors import FingerprintMismatch, StateError

if TYPE_CHECKING:
    from sleeptui.ledger import Ledger

Factors = dict[int, tuple[np.ndarray, np.ndarray]]
"""Per layer, the factors (u, v) of ΔW = u @ v."""
DELTA_FORMAT = "sleeptui-delta/1"


@dataclass(frozen=True)
class Shapes:
    """What a delta for this model must look like."""

    d_model: int
    d_ff: int
    n_layers: int


def encode(factors: Factors, memory_id: str, fingerprint: str, model: str) -> bytes:
    """The bytes of a delta file."""
    tensors = {}
    for layer, (u, v) in sorted(factors.items()):
        tensors[down_proj_name(layer) + ".u"] = np.ascontiguousarray(u, dtype=np.float32)
        tensors[down_proj_name(layer) + ".v"] = np.ascontiguousarray(v, dtype=np.float32)
    meta = {
        "format": DELTA_FORMAT,
        "memory_id": memory_id,
        "fingerprint": fingerprint,
        "model": model,
    }
    return save(tensors, metadata=meta)


def decode(data: bytes, source: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata of a delta file's bytes.

    Raises:
        StateError: naming ``source``: the bytes are not a safetensors file.
    """
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not a table")
        tensors = load(data)
    except (SafetensorError, ValueError, AttributeError, RecursionError) as e:
        raise StateError(f"{source} is not a readable safetensors file ({e}).") from e
    return tensors, {str(k): str(v) for k, v in meta.items()}


def mismatch(
    meta: dict[str, str], memory_id: str, ledger: Ledger | None, source: str
) -> StateError | None:
    """What makes a delta's metadata wrong for memory ``memory_id`` of ``ledger``, as the error
    to raise, or None."""
    if meta.get("format") != DELTA_FORMAT:
        return StateError(
            f"{source} is not a sleeptui delta (its metadata has no format "
            f"'{DELTA_FORMAT}'); nothing was changed."
        )
    theirs = meta.get("fingerprint", "")
    if ledger is not None and theirs != ledger.fingerprint:
        return FingerprintMismatch(
            f"{source} belongs to another model ('{meta.get('model', 'unknown')}', fingerprint "
            f"{theirs[:12]}), not to the model of this folder ('{ledger.model}', fingerprint "
            f"{ledger.fingerprint[:12]}); it was probably copied from another state folder. "
            "Nothing was changed; put this folder's own file back."
        )
    if meta.get("memory_id") != memory_id:
        return StateError(
            f"{source} holds the delta of memory {meta.get('memory_id')!r}, not of "
            f"{memory_id}; nothing was changed. Put the memory's own file back."
        )
    return None


def parse_factors(tensors: dict[str, np.ndarray], shapes: Shapes, source: str) -> Factors:
    """Factors from a delta file's tensors, checked against the model's shapes.

    Raises:
        StateError: an unexpected tensor, a wrong shape or a value that is not finite.
    """
    names = {down_proj_name(layer): layer for layer in range(shapes.n_layers)}
    factors: Factors = {}
    for key in tensors:
        base, _, part = key.rpartition(".")
        if base not in names or part not in ("u", "v"):
            raise StateError(
                f"{source} holds an unexpected tensor '{key}'; it is not a sleeptui delta."
            )
    for base, layer in names.items():
        u, v = tensors.get(base + ".u"), tensors.get(base + ".v")
        if u is None and v is None:
            continue
        if (
            u is None
            or v is None
            or u.ndim != 2
            or v.ndim != 2
            or u.shape[1] != v.shape[0]
            or u.shape[0] != shapes.d_model
            or v.shape[1] != shapes.d_ff
        ):
            got = f"u {None if u is None else u.shape}, v {None if v is None else v.shape}"
            raise StateError(
                f"{source} has factors of the wrong shape for {base} ({got}; this model needs "
                f"u ({shapes.d_model} × r) and v (r × {shapes.d_ff})): it belongs to another model."
            )
        u, v = u.astype(np.float32), v.astype(np.float32)
        if not (np.isfinite(u).all() and np.isfinite(v).all()):
            raise StateError(
                f"{source} holds values that are not finite numbers in {base}; it is damaged."
            )
        factors[layer] = (u, v)
    return factors
