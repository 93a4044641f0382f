"""Fit step tables to an activation's exact derivative.

Objective: for an activation h and ``K = 2**bits`` intervals, choose thresholds
``c_1 < ... < c_{K-1}`` and levels ``l_0 .. l_{K-1}`` minimising

    E_{x ~ p} [ (h'(x) - l_{code(x)})^2 ]

i.e. the expected squared error of the gradient multiplier. With the incoming gradient
independent of x this is proportional to the expected squared error of the input gradient,
which is what decides how close Approx-BP stays to exact backprop.

For fixed intervals the best level is the p-weighted mean of h' over the interval, so the
problem is an optimal 1-D segmentation. It is solved *exactly* on a fine grid by dynamic
programming (no annealing, no random restarts), which makes regeneration deterministic.

The distribution p (documented in docs/ops.md, "Tables"):

    p = 0.9 * MiniLM + 0.1 * Uniform[-8, 8]

where "MiniLM" is the measured histogram of the GELU pre-activations of the pretrained
all-MiniLM-L6-v2 (file ``minilm_preactivations.json``, made by
``benchmarks/measure_preactivations.py``). The uniform part is the paper's whole-line
criterion at a small weight: it keeps intervals that this one model rarely visits (large
positive inputs, which other models do visit) from getting arbitrary levels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

from lightning_approxbp.activations import get_activation

PREACTIVATIONS_FILE = "minilm_preactivations.json"
UNIFORM_WEIGHT = 0.1
GRID_POINTS_PER_BIN = 4


@dataclass(frozen=True)
class Fit:
    thresholds: tuple[float, ...]
    levels: tuple[float, ...]
    expected_squared_error: float


def load_preactivation_histogram() -> tuple[np.ndarray, np.ndarray]:
    """Return (bin_edges, probability mass per bin) of the measured MiniLM pre-activations."""
    text = resources.files("lightning_approxbp.tables").joinpath(PREACTIVATIONS_FILE).read_text()
    data = json.loads(text)
    edges = np.asarray(data["bin_edges"], dtype=np.float64)
    mass = np.asarray(data["density"], dtype=np.float64)
    return edges, mass / mass.sum()


def fitting_grid() -> tuple[np.ndarray, np.ndarray]:
    """Grid points and their probability weights under the documented mixture."""
    edges, mass = load_preactivation_histogram()
    n_bins = len(mass)
    width = (edges[-1] - edges[0]) / n_bins
    # Points at the centres of equal sub-cells of every histogram bin.
    offsets = (np.arange(GRID_POINTS_PER_BIN) + 0.5) / GRID_POINTS_PER_BIN * width
    points = (edges[:-1, None] + offsets[None, :]).reshape(-1)
    measured = np.repeat(mass / GRID_POINTS_PER_BIN, GRID_POINTS_PER_BIN)
    uniform = np.full_like(measured, 1.0 / measured.size)
    return points, (1.0 - UNIFORM_WEIGHT) * measured + UNIFORM_WEIGHT * uniform


def optimal_segmentation(values: np.ndarray, weights: np.ndarray, n_segments: int) -> tuple[list[int], float]:
    """Split ``values`` (ordered along x) into contiguous segments minimising weighted variance.

    Returns the start indices of segments 1..n-1 and the total weighted squared error.
    """
    n = values.size
    w = np.concatenate([[0.0], np.cumsum(weights)])
    s = np.concatenate([[0.0], np.cumsum(weights * values)])
    q = np.concatenate([[0.0], np.cumsum(weights * values * values)])
    # cost[i, j] = weighted squared error of values[i:j] around its weighted mean.
    dw = w[None, :] - w[:, None]
    ds = s[None, :] - s[:, None]
    dq = q[None, :] - q[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = np.where(dw > 0, dq - ds * ds / np.where(dw > 0, dw, 1.0), 0.0)
    cost = np.maximum(cost, 0.0)
    invalid = np.tril(np.ones((n + 1, n + 1), dtype=bool))  # segments must be non-empty: i < j
    cost[invalid] = np.inf

    best = cost[0].copy()  # best[j]: error of values[:j] in one segment
    choices = []
    for _ in range(1, n_segments):
        total = best[:, None] + cost
        choice = np.argmin(total, axis=0)
        best = total[choice, np.arange(n + 1)]
        choices.append(choice)
    starts = []
    end = n
    for choice in reversed(choices):
        end = int(choice[end])
        starts.append(end)
    return sorted(starts), float(best[n])


def fit_table(activation: str, bits: int) -> Fit:
    """Fit the ``bits``-bit step derivative of ``activation`` (deterministic)."""
    points, weights = fitting_grid()
    derivative = get_activation(activation).derivative(torch.from_numpy(points)).numpy()
    starts, error = optimal_segmentation(derivative, weights, 2**bits)
    bounds = [0, *starts, points.size]
    levels = []
    for lo, hi in zip(bounds, bounds[1:]):
        levels.append(float(np.average(derivative[lo:hi], weights=weights[lo:hi])))
    # A threshold sits halfway between the last point of one segment and the first of the next.
    thresholds = [float(0.5 * (points[i - 1] + points[i])) for i in starts]
    return Fit(tuple(thresholds), tuple(levels), error)


def expected_squared_error(activation: str, thresholds: tuple[float, ...], levels: tuple[float, ...]) -> float:
    """The objective above, evaluated for any table (e.g. the paper's) on the same grid."""
    points, weights = fitting_grid()
    x = torch.from_numpy(points)
    exact = get_activation(activation).derivative(x)
    codes = torch.zeros_like(x, dtype=torch.long)
    for threshold in thresholds:
        codes += (x > threshold).long()
    step = torch.tensor(levels, dtype=torch.float64)[codes]
    return float(np.sum(weights * ((exact - step) ** 2).numpy()))
