"""The per-row kernels under `xwin_jobs.selection`, compiled with numba.

    idx, val = ranked_rows(scores, upto)   # ranks 1..upto of every row (upto 1: the best)
    idx, val = worst_rows(scores)          # the last response in every row's order

Each reads a (P, N) float32/float64 table once, in parallel over rows (numba `prange`, one
chunk of rows per thread), and treats every non-finite cell (NaN, +inf, -inf) as invalid
inline: there is no validity pass, no NaN-cleaning copy and no temporary the size of the
table. The order is the one of selection.py: descending score, ties broken by ascending
response index.

Why compiled: numpy's per-row argmax / argmin already take ~4x less time than pandas'
groupby, but each rank needs a pass that maps NaN to -inf first, and the reversed argmin of
`worst` runs on a strided view. One fused pass per row keeps every score in a register,
which is what makes selection over 10^6 prompts x 64 responses a few tens of ms (see
benchmarks/RESULTS.md, ## Selection).

The kernels compile on first use for each dtype (about 0.5 s each, not cached on disk: job
images may have a read-only site-packages). Threads: numba's default (the machine's cores),
capped by NUMBA_NUM_THREADS.
"""

from __future__ import annotations

import numba
import numpy as np


# Each kernel first walks a row with plain comparisons, which NaN fails by itself (and -inf
# for the best / +inf for the worst); only a row whose result came out infinite (an inf
# cell, rare) is walked again with the exact finite test. This keeps the hot loop branch-light.

@numba.njit(parallel=True, nogil=True)
def _best_kernel(s, idx, val):  # pragma: no cover - compiled
    rows, n = s.shape
    for p in numba.prange(rows):
        hi, at = -np.inf, 0
        for j in range(n):
            x = s[p, j]
            if x > hi:                               # >: the earliest among tied highest
                hi, at = x, j
        if hi == np.inf:
            hi, at = -np.inf, 0
            for j in range(n):
                x = s[p, j]
                if x > hi and x < np.inf:
                    hi, at = x, j
        idx[p] = at
        val[p] = hi


@numba.njit(parallel=True, nogil=True)
def _worst_kernel(s, idx, val):  # pragma: no cover - compiled
    rows, n = s.shape
    for p in numba.prange(rows):
        lo, at = np.inf, 0
        for j in range(n):
            x = s[p, j]
            if x <= lo:                              # <=: the latest among tied lowest
                lo, at = x, j
        if lo == -np.inf:
            lo, at = np.inf, 0
            for j in range(n):
                x = s[p, j]
                if x <= lo and x > -np.inf:
                    lo, at = x, j
        if lo == np.inf:
            at = 0                                   # no valid cell (or only +inf ones)
        idx[p] = at
        val[p] = lo


@numba.njit(inline="always")
def _rank_row(s, p, upto, idx, val, finite_only):  # pragma: no cover - compiled
    """Insertion of row p's cells into its `upto` best, kept sorted (descending score,
    ascending index)."""
    filled = 0
    last = -np.inf          # what a cell must beat: -inf until every rank is filled
    for j in range(s.shape[1]):
        x = s[p, j]
        if not x > last:    # NaN, -inf, or (all ranks filled) not better than the last rank
            continue
        if finite_only and x == np.inf:
            continue
        if filled < upto:
            pos = filled
            filled += 1
        else:
            pos = upto - 1
        while pos > 0 and val[p, pos - 1] < x:   # strict: an equal score ranked earlier stays first
            val[p, pos] = val[p, pos - 1]
            idx[p, pos] = idx[p, pos - 1]
            pos -= 1
        val[p, pos] = x
        idx[p, pos] = j
        if filled == upto:
            last = val[p, upto - 1]


@numba.njit(parallel=True, nogil=True)
def _ranked_kernel(s, upto, idx, val):  # pragma: no cover - compiled
    for p in numba.prange(s.shape[0]):
        _rank_row(s, p, upto, idx, val, False)
        if val[p, 0] == np.inf:
            for r in range(upto):
                val[p, r] = -np.inf
                idx[p, r] = 0
            _rank_row(s, p, upto, idx, val, True)


def ranked_rows(s: np.ndarray, upto: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (P, upto) int64 of each row's ranks 1..upto and their scores (s.dtype); where a
    row has fewer valid cells than a rank, that rank's score is -inf and its index 0."""
    s = np.ascontiguousarray(s)
    idx = np.zeros((s.shape[0], upto), dtype=np.int64)
    val = np.full((s.shape[0], upto), -np.inf, dtype=s.dtype)
    if not (s.shape[0] and s.shape[1]):
        return idx, val
    if upto == 1:
        _best_kernel(s, idx.reshape(-1), val.reshape(-1))   # (P, 1) -> (P,) views
    else:
        _ranked_kernel(s, upto, idx, val)
    return idx, val


def worst_rows(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index (P,) int64 and score of each row's last response in the order (its lowest valid
    score, the latest among ties); the score is +inf (index 0) where a row has no valid cell."""
    s = np.ascontiguousarray(s)
    idx = np.zeros(s.shape[0], dtype=np.int64)
    val = np.full(s.shape[0], np.inf, dtype=s.dtype)
    if s.shape[0] and s.shape[1]:
        _worst_kernel(s, idx, val)
    return idx, val
