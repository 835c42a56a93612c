"""Exports of social pairs: WebDataset shards (pipeline/shards.py) and a Pick-a-Pic v2 Parquet.

Which side the winner lands on is decided by a hash of (seed, pair_id), so labels are balanced and
the same pairs always give the same bytes. Pick-a-Pic convention: label_0/label_1 = 1.0 for the
preferred image, 0.0 for the other."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from pipeline.decode import as_jpeg
from pipeline.ids import stable_key
from pipeline.shards import write_manifest, write_shards
from pipeline.splits import hash_split
from pipeline.storage import write_parquet_atomic


def winner_side(pair_id: str, seed: int = 0) -> int:
    """0 or 1: where the winner goes. Deterministic, about half and half."""
    return int(stable_key("social-side", seed, pair_id)[:8], 16) & 1


class _ImageCache:
    def __init__(self, info: dict):
        self.info = info  # image_id -> (path, model)
        self.cache: dict[str, bytes] = {}

    def get(self, image_id: str) -> bytes:
        b = self.cache.get(image_id)
        if b is None:
            b = as_jpeg(Path(self.info[image_id][0]).read_bytes())
            self.cache[image_id] = b
        return b


def _sides(pairs: pa.Table, seed: int):
    d = pairs.to_pydict()
    for j in range(pairs.num_rows):
        row = {k: d[k][j] for k in d}
        side = winner_side(row["pair_id"], seed)
        yield row, side


def _evidence(row: dict) -> dict:
    keys = (
        "prob",
        "winner_exposure",
        "loser_exposure",
        "winner_impressions",
        "loser_impressions",
        "winner_score",
        "loser_score",
        "winner_rate",
        "loser_rate",
    )
    return {k: row[k] for k in keys}


def split_of(prompt_group: str, eval_fraction: float, salt: str = "social-v1") -> str:
    """'eval' for a deterministic eval_fraction of prompt groups, else 'train'."""
    return hash_split(prompt_group, eval_fraction, salt)


def split_pairs(pairs: pa.Table, eval_fraction: float) -> dict[str, pa.Table]:
    """Pairs by split; a prompt group is wholly in one split."""
    splits = [split_of(g, eval_fraction) for g in pairs.column("prompt_group").to_pylist()]
    mask = pa.array([s == "eval" for s in splits], type=pa.bool_())  # typed even when empty
    return {"train": pairs.filter(pa.compute.invert(mask)), "eval": pairs.filter(mask)}


def write_webdataset(
    pairs: pa.Table, image_info: dict, out_dir: Path, cfg, stats: dict | None = None
) -> Path:
    """Per split (out_dir/train, out_dir/eval, split by prompt group): <pair_id>.0.jpg,
    <pair_id>.1.jpg, <pair_id>.json (caption, label_0, label_1, user_id, uids, image ids, kind,
    evidence) in social-<split>-NNNNNN.tar, plus a manifest.json in each split folder."""
    cache = _ImageCache(image_info)
    out_dir = Path(out_dir)
    for split, part in split_pairs(pairs, cfg.eval_fraction).items():
        _write_webdataset_split(part, cache, out_dir / split, split, cfg, stats)
    return out_dir


def _write_webdataset_split(pairs: pa.Table, cache, out_dir: Path, split: str, cfg, stats) -> None:
    def samples():
        for row, side in _sides(pairs, cfg.seed):
            ids = [row["winner_image_id"], row["loser_image_id"]]
            uids = [row["winner_uid"], row["loser_uid"]]
            if side == 1:
                ids.reverse()
                uids.reverse()
            yield {
                "__key__": row["pair_id"],
                "0.jpg": cache.get(ids[0]),
                "1.jpg": cache.get(ids[1]),
                "json": {
                    "caption": row["prompt"],
                    "label_0": 1 if side == 0 else 0,
                    "label_1": 1 if side == 1 else 0,
                    "user_id": row["user_id"],
                    "kind": row["kind"],
                    "pair_id": row["pair_id"],
                    "prompt_group": row["prompt_group"],
                    "image_id_0": ids[0],
                    "image_id_1": ids[1],
                    "uid_0": uids[0],
                    "uid_1": uids[1],
                    "uids": uids,
                    "winner_uid": row["winner_uid"],
                    "evidence": _evidence(row),
                    "split": split,
                },
            }

    shards = write_shards(samples(), out_dir, f"social-{split}", max_count=cfg.shard_max_count)
    extra = {"split": split, "counts": {k: v for k, v in (stats or {}).items() if isinstance(v, (int, float))}}
    write_manifest(out_dir, "social_pairs", shards, cfg.to_dict(), extra=extra)


PICKAPIC_SCHEMA = pa.schema(
    [
        ("are_different", pa.bool_()),
        ("best_image_uid", pa.string()),
        ("caption", pa.string()),
        ("has_label", pa.bool_()),
        ("image_0_uid", pa.string()),
        ("image_1_uid", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("ranking_id", pa.int64()),
        ("user_id", pa.string()),  # Pick-a-Pic has an int64 here; ours are the log's string ids
        ("pair_id", pa.string()),
        ("kind", pa.string()),
        ("prob", pa.float64()),
    ]
)


def write_pickapic(pairs: pa.Table, image_info: dict, out_dir: Path, cfg) -> Path:
    """Pick-a-Pic v2 columns in train-NNNNN-of-NNNNN.parquet and validation-NNNNN-of-NNNNN.parquet
    files under out_dir (split by prompt group), readable with
    datasets.load_dataset("parquet", data_dir=out_dir) (splits "train" and "validation") and
    therefore with diffusers' train_diffusion_dpo.py (--dataset_name=<out_dir> --dataset_split_name=train)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("train-*.parquet"), *out_dir.glob("validation-*.parquet")]:
        old.unlink()
    cache = _ImageCache(image_info)
    parts = split_pairs(pairs, cfg.eval_fraction)
    for split, name in (("train", "train"), ("eval", "validation")):
        if parts[split].num_rows or split == "train":
            _write_pickapic_split(parts[split], image_info, cache, out_dir, name, cfg)
    return out_dir


def _write_pickapic_split(pairs: pa.Table, image_info: dict, cache, out_dir: Path, name: str, cfg) -> None:
    per_file = max(1, cfg.shard_max_count)
    n_files = max(1, -(-pairs.num_rows // per_file))
    rows = list(_sides(pairs, cfg.seed))
    for f in range(n_files):
        chunk = rows[f * per_file : (f + 1) * per_file]
        cols = {name: [] for name in PICKAPIC_SCHEMA.names}
        for row, side in chunk:
            ids = [row["winner_image_id"], row["loser_image_id"]]
            uids = [row["winner_uid"], row["loser_uid"]]
            if side == 1:
                ids.reverse()
                uids.reverse()
            cols["are_different"].append(uids[0] != uids[1])
            cols["best_image_uid"].append(row["winner_uid"])
            cols["caption"].append(row["prompt"])
            cols["has_label"].append(True)
            cols["image_0_uid"].append(uids[0])
            cols["image_1_uid"].append(uids[1])
            cols["jpg_0"].append(cache.get(ids[0]))
            cols["jpg_1"].append(cache.get(ids[1]))
            cols["label_0"].append(1.0 if side == 0 else 0.0)
            cols["label_1"].append(1.0 if side == 1 else 0.0)
            cols["model_0"].append(image_info[ids[0]][1])
            cols["model_1"].append(image_info[ids[1]][1])
            cols["ranking_id"].append(int(row["pair_id"][:15], 16))
            cols["user_id"].append(row["user_id"])
            cols["pair_id"].append(row["pair_id"])
            cols["kind"].append(row["kind"])
            cols["prob"].append(row["prob"])
        table = pa.table(cols, schema=PICKAPIC_SCHEMA)
        write_parquet_atomic(table, out_dir / f"{name}-{f:05d}-of-{n_files:05d}.parquet")
