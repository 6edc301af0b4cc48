"""Weighted mixtures as plain index arithmetic: which (source, row) pairs make up an epoch, in what order.

A source of n rows with weight w contributes round(w·n) rows per epoch: w < 1 takes a seeded random subset, w > 1
repeats every row ⌊w⌋ times plus a random subset for the fraction. The whole list is then shuffled with the seed, so
the same spec and seed always give the same order, and an evaluation split taken from its head never shares a row
with the training part (repeats of an evaluation row are removed from training too).
"""

from __future__ import annotations

import numpy as np


def epoch_index(sizes: list[int], weights: list[float], seed: int = 0, shuffle: bool = True) -> np.ndarray:
    """`(k, 2)` int64 array of (source, row) pairs for one epoch of the mixture."""
    rng = np.random.default_rng(seed)
    parts = []
    for source, (n, weight) in enumerate(zip(sizes, weights, strict=True)):
        if n == 0 or weight <= 0:
            continue
        take = int(round(weight * n))
        repeats, rest = divmod(take, n)
        rows = [np.tile(np.arange(n), repeats), np.sort(rng.permutation(n)[:rest])]
        rows = np.concatenate(rows)
        parts.append(np.stack([np.full(len(rows), source), rows], axis=1))
    if not parts:
        return np.zeros((0, 2), dtype=np.int64)
    index = np.concatenate(parts).astype(np.int64)
    return index[rng.permutation(len(index))] if shuffle else index


def split_off(index: np.ndarray, eval_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval): eval is the first `eval_size` distinct pairs; train is everything else (their repeats too)."""
    if eval_size <= 0:
        return index, index[:0]
    keys = index[:, 0] * (1 << 40) + index[:, 1]
    _, first = np.unique(keys, return_index=True)
    eval_rows = np.sort(first)[:eval_size]
    held = np.isin(keys, keys[eval_rows])
    return index[~held], index[eval_rows]


def stream_plan(weight: float) -> tuple[int, float]:
    """For streaming: full passes over a source and the keep-probability of rows in the last, partial pass."""
    passes, fraction = divmod(max(0.0, weight), 1.0)
    return int(passes), float(fraction)
