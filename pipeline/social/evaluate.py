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
