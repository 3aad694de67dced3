"""Cells that mean something: features computed from a text itself, the cells whose values follow
each feature best (Pearson's r over the text), and how often each gate is saturated.

After Karpathy, Johnson and Fei-Fei, "Visualizing and Understanding Recurrent Networks" (2015): a
character LSTM has single cells that track the position in the line, quotes and brackets. Every
feature is a value per character read, like the network's state after that character; most are
what the network could know having read the text so far, two look ahead to the line's end
(line_fraction, speaker_line): a cell can still follow them, from the line's start on.

Candidates are every cell of every layer, its hidden state and (LSTM) its cell state; a feature that
is constant over the text (a text without quotes) has no correlation and ranks no cell. A gate is
saturated when it is shut or wide open: a sigmoid gate below 0.1 or above 0.9, a tanh value
(candidate; the RNN's tanh(preactivation), its hidden state) below -0.9 or above 0.9, where its
gradient is under a fifth of its largest (the vanishing-gradient story of the tutorials).

A long text is read in pieces of PIECE characters, the state carried from one to the next, and
only running sums are kept: memory does not grow with the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from model.runtime.inside import SIGMOID_GATES, Network, State, Trace

PIECE = 1_000  # characters traced at once (their gates are held in memory together)
SATURATED = 0.9  # |tanh| above this, or a sigmoid below 1 - this or above this
FEATURES = {
    "in_quotes": "inside quotes",
    "in_brackets": "inside brackets or parentheses",
    "line_chars": "characters since the last newline",
    "line_fraction": "position in the line (0 to 1)",
    "in_word": "inside a word",
    "upper_case": "upper case",
    "speaker_line": "a speaker line (NAME:)",
}
QUOTES = {'"': None, "“": True, "”": False}  # None: toggles; True opens, False closes
OPENING, CLOSING = "([{", ")]}"
SPEAKER = re.compile(r"[A-Z][A-Za-z'. -]{0,40}:")  # tinyshakespeare's "First Citizen:", "KING RICHARD III:"


def features(chars: list[str] | str) -> dict[str, np.ndarray]:
    """Each feature's value after each character, (T,) float64, by FEATURES id."""
    T = len(chars)
    out = {name: np.zeros(T) for name in FEATURES}
    quoted, depth, col = False, 0, 0
    line_start = 0
    for t, c in enumerate(chars):
        if c in QUOTES:
            quoted = (not quoted) if QUOTES[c] is None else QUOTES[c]
        elif c in OPENING:
            depth += 1
        elif c in CLOSING:
            depth = max(0, depth - 1)
        out["in_quotes"][t] = quoted
        out["in_brackets"][t] = depth > 0
        out["in_word"][t] = c.isalnum() or (c == "'" and 0 < t < T - 1 and chars[t - 1].isalpha() and chars[t + 1].isalpha())
        out["upper_case"][t] = c.isupper()
        if c == "\n":
            _line(out, chars, line_start, t)
            col, line_start = 0, t + 1
        else:
            col += 1
        out["line_chars"][t] = col
    _line(out, chars, line_start, T)
    return out


def _line(out: dict[str, np.ndarray], chars, start: int, end: int) -> None:
    """The features of the line chars[start:end] (its newline, at `end`, belongs to the next line's start)."""
    n = end - start
    if n == 0:
        return
    out["line_fraction"][start:end] = np.arange(1, n + 1) / n
    if SPEAKER.fullmatch("".join(chars[start:end])):
        out["speaker_line"][start:end] = 1.0


@dataclass(frozen=True)
class RankedCell:
    layer: int  # 1-based
    quantity: str  # hidden | cell
    cell: int  # 0-based unit index
    r: float


@dataclass(frozen=True)
class Saturation:
    layer: int
    gate: str
    low: float  # share of the values that are shut (below 0.1, or -0.9 for tanh)
    high: float  # share wide open (above 0.9)


class CellStatistics:
    """Running sums over a text read in pieces: each cell's correlation with each feature, and each
    gate's saturation."""

    def __init__(self, network: Network):
        self.network = network
        L, H = len(network.layers), network.units
        self.quantities = ("hidden", "cell") if network.cell == "lstm" else ("hidden",)
        N, K = L * len(self.quantities) * H, len(FEATURES)
        self.n = 0
        self.sa, self.saa = np.zeros(N), np.zeros(N)
        self.sf, self.sff = np.zeros(K), np.zeros(K)
        self.saf = np.zeros((N, K))
        self.low = np.zeros((L, len(network.gates)))
        self.high = np.zeros((L, len(network.gates)))

    def add(self, ids: np.ndarray, feats: dict[str, np.ndarray], state: State | None = None) -> Trace:
        """Read `ids` (T,) from `state` with their features (T,) each; returns their trace (its
        state is the one after them)."""
        trace = self.network.trace(ids, state=state)
        columns = []
        for i, layer in enumerate(trace.layers):
            columns += [layer.hidden] + ([layer.cell] if layer.cell is not None else [])
            for j, gate in enumerate(self.network.gates):
                v = layer.gates[gate] if gate != "preactivation" else layer.hidden  # the RNN's tanh(preactivation)
                lo = (1 - SATURATED) if gate in SIGMOID_GATES else -SATURATED
                self.low[i, j] += np.count_nonzero(v < lo) / v.shape[1]
                self.high[i, j] += np.count_nonzero(v > SATURATED) / v.shape[1]
        A = np.concatenate(columns, axis=1).astype(np.float64)  # (T, N)
        F = np.stack([feats[name] for name in FEATURES], axis=1)  # (T, K)
        self.n += len(A)
        self.sa += A.sum(0)
        self.saa += np.einsum("tn,tn->n", A, A)
        self.sf += F.sum(0)
        self.sff += np.einsum("tk,tk->k", F, F)
        self.saf += A.T @ F
        return trace

    def correlations(self) -> np.ndarray:
        """(N, K) Pearson's r of every cell with every feature; 0 where either is constant."""
        n = self.n
        cov = n * self.saf - np.outer(self.sa, self.sf)
        var_a = np.maximum(n * self.saa - self.sa ** 2, 0.0)
        var_f = np.maximum(n * self.sff - self.sf ** 2, 0.0)
        denom = np.sqrt(np.outer(var_a, var_f))
        # a cell or feature whose variance is rounding noise (n^2 x variance below n^2 x 1e-12) is constant
        noise = 1e-12 * n * n
        constant = (var_a <= noise)[:, None] | (var_f <= noise)[None, :]
        return np.where(constant, 0.0, cov / np.where(denom > 0, denom, 1.0))

    def ranking(self, top: int) -> dict[str, list[RankedCell]]:
        """The `top` cells per feature by |r| (sign kept), best first; [] for a constant feature."""
        r = self.correlations()
        H, Q = self.network.units, len(self.quantities)
        out = {}
        for k, name in enumerate(FEATURES):
            column = r[:, k]
            if not np.any(column):
                out[name] = []
                continue
            best = np.argsort(-np.abs(column), kind="stable")[:top]
            out[name] = [RankedCell(int(j // (Q * H)) + 1, self.quantities[int(j // H) % Q], int(j % H), float(column[j]))
                         for j in best]
        return out

    def saturation(self) -> list[Saturation]:
        """Each layer's gates, in layer and gate order."""
        n = max(self.n, 1)
        return [Saturation(i + 1, gate, float(self.low[i, j] / n), float(self.high[i, j] / n))
                for i in range(len(self.network.layers)) for j, gate in enumerate(self.network.gates)]


def statistics(network: Network, ids: np.ndarray, chars: list[str] | str,
               each: Callable[[Trace], None] | None = None) -> CellStatistics:
    """The statistics of a whole text (ids and the characters they are), read in PIECEs from the
    zero state; `each` sees each piece's trace (what /v1/inspect also returns, kept from them)."""
    feats = features(chars)
    stats = CellStatistics(network)
    state = None
    for start in range(0, len(ids), PIECE):
        end = start + PIECE
        trace = stats.add(ids[start:end], {k: v[start:end] for k, v in feats.items()}, state)
        if each is not None:
            each(trace)
        state = trace.state
    return stats


def report(stats: CellStatistics, top: int) -> dict:
    """The ranking and the saturation as /v1/inspect and `chargen inspect --json` give them (r and
    shares rounded to 4 decimals)."""
    return {"ranking": [{"feature": name, "label": FEATURES[name],
                         "cells": [{"layer": c.layer, "quantity": c.quantity, "cell": c.cell, "r": round(c.r, 4)} for c in ranked]}
                        for name, ranked in stats.ranking(top).items()],
            "saturation": [{"layer": s.layer, "gate": s.gate, "low": round(s.low, 4), "high": round(s.high, 4)}
                           for s in stats.saturation()]}
