"""Promotion on held-out evidence: a trained model replaces the current one (``LATEST``, the
``social_reward`` scorer, the LoRA a pipeline loads) only when the 95% Wilson lower bound of its
held-out pairwise accuracy beats both chance (0.5) and the incumbent's accuracy measured on the same
held-out pairs. One edge: an incumbent that is perfect (1.0) on those pairs cannot be beaten by any
lower bound, so there a model that is also perfect on them (and beats chance) is promoted: the
pairs cannot show an improvement, and a tie at the ceiling is no regression.

Every trainer's evaluation is a pairwise accuracy, ties counting half:
- reward model: the winner scores above the loser;
- DPO: the LoRA's implicit reward prefers the winner (model_diff < ref_diff);
- identity adapter: a held-out face is more like its ground truth under the trained adapter than under
  the untrained one.

A model that is not promoted is kept in its version folder, with the decision and its reason in
``promotion.json`` and in the run's metadata. Smoke runs (tiny random-init models) are never
promoted: that is their expected outcome, not a failure.

``LATEST`` of a model family is ``models/<family>/LATEST`` (the version's folder name); each version's
``promotion.json`` records which version it replaced, so that a rerun of an already promoted version
compares against the model it replaced, not against itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from training.checkpoints import atomic_write_text

CHANCE = 0.5
Z_95 = 1.959963984540054
DECISION_FILE = "promotion.json"
LATEST_FILE = "LATEST"


def wilson_interval(wins: float, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion; ``wins`` may be fractional (ties count half). None for
    n == 0: an empty input has no interval."""
    if n <= 0:
        return None
    p = min(max(wins / n, 0.0), 1.0)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluation(wins: float, n: int, measure: str) -> dict:
    """A held-out evaluation as the promotion rule reads it (``measure`` says what was counted)."""
    n = int(n)
    if n == 0:
        return {"measure": measure, "pairs": 0}
    lo, hi = wilson_interval(wins, n)
    return {"measure": measure, "pairs": n, "wins": float(wins), "accuracy": wins / n, "ci_low": lo, "ci_high": hi,
            "interval": "Wilson 95%"}


def decide(new: Mapping, incumbent: Mapping | None, smoke: bool) -> dict:
    """The promotion decision for ``new`` (an ``evaluation``). ``incumbent``: None when there is no
    current model; else {"version", and "accuracy" measured on the same pairs, or "error" saying why it
    could not be}."""
    baseline, baseline_from = CHANCE, "chance"
    if incumbent is not None and incumbent.get("accuracy") is not None and incumbent["accuracy"] > baseline:
        baseline, baseline_from = float(incumbent["accuracy"]), f"incumbent {incumbent['version']}"
    out = {"promoted": False, "baseline": baseline, "baseline_from": baseline_from, "chance": CHANCE,
           "incumbent": dict(incumbent) if incumbent is not None else None, "smoke_run": smoke}
    if not new.get("pairs"):
        return {**out, "reason": "empty held-out split: nothing was measured"}
    lo = new["ci_low"]
    if smoke:
        return {**out, "reason": "smoke run: tiny random-init models are never promoted (expected, not a failure)"}
    if lo <= CHANCE:
        return {**out, "reason": f"no evidence of skill: the 95% lower bound {lo:.3f} of the held-out accuracy "
                                 f"{new['accuracy']:.3f} ({new['pairs']} pairs) does not beat chance {CHANCE}"}
    if incumbent is not None and incumbent.get("accuracy") is None:
        return {**out, "reason": f"the incumbent {incumbent.get('version')} could not be evaluated on the same "
                                 f"held-out pairs ({incumbent.get('error')}): nothing to compare with"}
    if incumbent is not None and baseline >= 1.0:
        # a perfect incumbent saturates these pairs: no model can show a lower bound above 1.0, so
        # "beats the incumbent" is unmeasurable here; an equal, perfect score is no regression
        if new["wins"] >= new["pairs"]:
            return {**out, "promoted": True, "reason": f"ties the perfect incumbent {incumbent['version']} (1.000) on "
                    f"the same {new['pairs']} pairs, which cannot show an improvement: a tie at the ceiling is no "
                    f"regression; 95% lower bound {lo:.3f} beats chance {CHANCE}"}
        return {**out, "reason": f"the incumbent {incumbent['version']} is perfect (1.000) on the same {new['pairs']} "
                                 f"pairs and this model is not ({new['accuracy']:.3f}): a regression"}
    if lo <= baseline:
        return {**out, "reason": f"does not beat the model it replaces: 95% lower bound {lo:.3f} <= incumbent "
                                 f"{incumbent['version']}'s accuracy {baseline:.3f} on the same {new['pairs']} pairs"}
    beaten = f"chance {CHANCE}" + (f" and incumbent {incumbent['version']} ({incumbent['accuracy']:.3f})"
                                   if incumbent is not None else " (no incumbent)")
    return {**out, "promoted": True, "reason": f"95% lower bound {lo:.3f} beats {beaten}"}


# ------------------------------------------------------------------------------------------------
# LATEST of a model family
# ------------------------------------------------------------------------------------------------


def read_latest(family_dir: Path) -> str | None:
    p = Path(family_dir) / LATEST_FILE
    return p.read_text().strip() or None if p.exists() else None


def read_decision(version_dir: Path) -> dict | None:
    p = Path(version_dir) / DECISION_FILE
    return json.loads(p.read_text()) if p.exists() else None


def incumbent_version(family_dir: Path, version: str) -> str | None:
    """The model a new ``version`` of this family would replace: ``LATEST``, or, when ``LATEST`` already
    is this version (a rerun after its promotion), the one it replaced then."""
    latest = read_latest(family_dir)
    if latest != version:
        return latest
    decision = read_decision(Path(family_dir) / version) or {}
    return decision.get("replaces")


def write_decision(version_dir: Path, decision: Mapping, replaces: str | None) -> None:
    atomic_write_text(Path(version_dir) / DECISION_FILE,
                      json.dumps({**decision, "replaces": replaces}, indent=2, default=str))


def publish(family_dir: Path, version: str) -> None:
    """Move ``LATEST`` to ``version`` (one atomic rename); only a promoted decision may call this."""
    Path(family_dir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(family_dir) / LATEST_FILE, version)
