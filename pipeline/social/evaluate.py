"""Precision of preference pairs against the simulator's ground truth, and yield per 1000 events."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def load_truth(truth_dir: Path) -> tuple[dict, dict]:
    """(image_id -> (quality, style[2])), (user_id -> taste[2]) from simulate()'s truth folder."""
    ti = pq.read_table(Path(truth_dir) / "images_truth.parquet").to_pydict()
    tu = pq.read_table(Path(truth_dir) / "users_truth.parquet").to_pydict()
    images = {
        i: (q, np.array([a, b]))
        for i, q, a, b in zip(ti["image_id"], ti["quality"], ti["style_0"], ti["style_1"])
    }
    users = {u: np.array([a, b]) for u, a, b in zip(tu["user_id"], tu["taste_0"], tu["taste_1"])}
    return images, users


def precision(pairs: pa.Table, truth_dir: Path) -> dict:
    """Fraction of pairs whose winner truly is better: latent quality for population pairs (and
    any pair without user_id), the user's utility (quality + taste . style) for per-user pairs."""
    images, users = load_truth(truth_dir)
    d = pairs.select(["winner_image_id", "loser_image_id", "user_id"]).to_pydict()
    pop_ok = pop_n = usr_ok = usr_n = 0
    for w, l, u in zip(d["winner_image_id"], d["loser_image_id"], d["user_id"]):
        qw, sw = images[w]
        ql, sl = images[l]
        if u is None:
            pop_n += 1
            pop_ok += qw > ql
        else:
            t = users[u]
            usr_n += 1
            usr_ok += (qw + t @ sw) > (ql + t @ sl)
    return {
        "population_pairs": pop_n,
        "population_precision": pop_ok / pop_n if pop_n else float("nan"),
        "user_pairs": usr_n,
        "user_precision": usr_ok / usr_n if usr_n else float("nan"),
    }


def group_fdr(pairs: pa.Table, truth_dir: Path) -> dict:
    """The population pairs' false discovery rate per prompt group, averaged over the groups that kept
    any: observed (the share of each group's pairs whose winner is not truly better) and what the
    posterior expects (the mean of 1 - prob over each group's pairs: the log-only figure)."""
    images, _ = load_truth(truth_dir)
    d = pairs.select(["prompt_group", "winner_image_id", "loser_image_id", "prob", "user_id"]).to_pydict()
    wrong: dict[str, list[float]] = {}
    expected: dict[str, list[float]] = {}
    for g, w, l, p, u in zip(
        d["prompt_group"], d["winner_image_id"], d["loser_image_id"], d["prob"], d["user_id"]
    ):
        if u is not None:
            continue
        wrong.setdefault(g, []).append(float(not images[w][0] > images[l][0]))
        expected.setdefault(g, []).append(1.0 - p)
    if not wrong:
        return {"groups": 0, "observed": None, "expected": None}
    return {
        "groups": len(wrong),
        "observed": float(np.mean([np.mean(v) for v in wrong.values()])),
        "expected": float(np.mean([np.mean(v) for v in expected.values()])),
    }


def bot_detection(bots: pa.Table, truth_dir: Path) -> dict:
    """Flagged accounts (build result .bots: user_id, rule) against the simulator's truth:
    caught / total per bot kind, people flagged by mistake, and precision / recall of the flags
    (precision None when nothing is flagged)."""
    t = pq.read_table(Path(truth_dir) / "users_truth.parquet", columns=["user_id", "bot_kind"]).to_pydict()
    kind = dict(zip(t["user_id"], t["bot_kind"]))
    rules = dict(zip(bots.column("user_id").to_pylist(), bots.column("rule").to_pylist()))
    by_kind: dict[str, dict] = {}
    for u, k in kind.items():
        if k is None:
            continue
        d = by_kind.setdefault(k, {"total": 0, "caught": 0, "by_rule": {}})
        d["total"] += 1
        if u in rules:
            d["caught"] += 1
            d["by_rule"][rules[u]] = d["by_rule"].get(rules[u], 0) + 1
    false_flags: dict[str, int] = {}
    for u, r in rules.items():
        if kind.get(u) is None:
            false_flags[r] = false_flags.get(r, 0) + 1
    n_bots = sum(d["total"] for d in by_kind.values())
    caught = sum(d["caught"] for d in by_kind.values())
    n_false = sum(false_flags.values())
    return {
        "by_kind": dict(sorted(by_kind.items())),
        "false_flags_by_rule": false_flags,
        "people": sum(1 for k in kind.values() if k is None),
        "flagged": len(rules),
        "precision": caught / (caught + n_false) if caught + n_false else None,
        "recall": caught / n_bots if n_bots else None,
    }


def export_report(pickapic_dir: Path, build_dir: Path, truth_dir: Path, split: str = "train") -> dict:
    """One split of a Pick-a-Pic export read back from disk, against the simulator's truth: rows,
    distinct image pairs, pairs (and their rows) that appear with both winners, the most rows one
    pair has, and precision: the share of rows whose preferred image has the higher latent
    quality, which is what a trainer that reads every row learns (a tie in quality counts half).
    Image uids map back to image ids through build_dir/social_images.parquet."""
    from pipeline.social.checks import contradicting_pairs, read_pickapic_winners

    rows = read_pickapic_winners(pickapic_dir, split)
    imgs = pq.read_table(Path(build_dir) / "social_images.parquet", columns=["image_id", "uid"]).to_pydict()
    image_of = dict(zip(imgs["uid"], imgs["image_id"]))
    quality = {i: q for i, (q, _) in load_truth(truth_dir)[0].items()}
    out = contradicting_pairs(rows["winner_uid"], rows["loser_uid"])
    right = 0.0
    for w, l_ in zip(rows["winner_uid"], rows["loser_uid"]):
        qw, ql = quality[image_of[w]], quality[image_of[l_]]
        right += 1.0 if qw > ql else 0.5 if qw == ql else 0.0
    out["precision"] = right / len(rows["winner_uid"]) if rows["winner_uid"] else None
    out["rows_with_user_id"] = sum(1 for u in rows["user_id"] if u is not None)
    if out["rows_with_user_id"]:  # per-user rows: contradictions within one user's pairs
        per_user = contradicting_pairs(rows["winner_uid"], rows["loser_uid"], rows["user_id"])
        out["contradicting_pairs_within_a_user"] = per_user["contradicting_pairs"]
    return out
