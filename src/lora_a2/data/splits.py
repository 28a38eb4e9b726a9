"""Seeded, class-stratified splits and samples of labelled rows (pure numpy)."""

from __future__ import annotations

import math

import numpy as np


def stratified_split(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split positions per class: ``test_fraction * n_c`` rounded half up (⌊x + ½⌋: 2.5 → 3,
    where Python's ``round`` gives 2) of class ``c`` go to test.

    Every class with ``n_c >= 2`` gets at least one test and one train example; a class with a
    single example stays in train. Returns sorted ``(train_idx, test_idx)``.
    """
    labels = np.asarray(labels)
    test_parts = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n = len(members)
        n_test = 0 if n < 2 else min(n - 1, max(1, math.floor(test_fraction * n + 0.5)))
        test_parts.append(members[:n_test])
    test_idx = np.sort(np.concatenate(test_parts)).astype(np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels), dtype=np.int64), test_idx)
    return train_idx, test_idx


def stratified_sample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of a class-proportional sample of ``size`` examples.

    When ``size`` allows, every class keeps at least one example; the rest is allotted in
    proportion to class size by largest remainder, so the total is exactly ``size``.
    """
    labels = np.asarray(labels)
    if size >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    floor = np.ones_like(counts) if size >= len(classes) else np.zeros_like(counts)
    spare = counts - floor
    quota = spare * (size - floor.sum()) / spare.sum()
    take = floor + np.floor(quota).astype(np.int64)
    short = size - int(take.sum())
    # Largest remainders first; stable sort keeps ties in class order for determinism.
    take[np.argsort(-(quota - np.floor(quota)), kind="stable")[:short]] += 1
    chosen = [
        rng.choice(np.flatnonzero(labels == cls), size=int(k), replace=False)
        for cls, k in zip(classes, take, strict=True)
    ]
    return np.sort(np.concatenate(chosen)).astype(np.int64)
