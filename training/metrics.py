"""Pairwise preference accuracy, counted honestly at the edges: a pair whose margin is exactly zero
(a tie: the model cannot tell winner from loser) counts half, so a model that has not moved from
its reference, or a collapsed scorer that gives every image the same score, reads 0.5, never 1."""

from __future__ import annotations

import torch


def pairwise_wins(margins: torch.Tensor) -> float:
    """Sum over pairs of 1 (margin > 0: the winner is preferred), 0.5 (tie) and 0 (margin < 0)."""
    m = margins.detach().float()
    return float((m > 0).sum().item() + 0.5 * (m == 0).sum().item())


def pairwise_accuracy(margins: torch.Tensor) -> float | None:
    """Mean of ``pairwise_wins``; None for no pairs (an empty input has no accuracy)."""
    n = margins.numel()
    return pairwise_wins(margins) / n if n else None
