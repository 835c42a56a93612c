"""Exports of social pairs: WebDataset shards (pipeline/shards.py) and a Pick-a-Pic v2 Parquet.

What goes where (build.py calls these once per kind):
- webdataset/ and pickapic/ hold the population pairs only: one row per unordered image pair,
  never two rows with opposite labels, so a trainer that reads every row (diffusers'
  train_diffusion_dpo.py does not look at `kind`) learns one consistent preference;
- per_user/webdataset/ and per_user/pickapic/ hold the per-user pairs, with user_id on every row
  (one row per user and image pair; different users may disagree, that is what they are for).

Which side the winner lands on is decided by a hash of (seed, pair_id), so labels are balanced and
the same pairs always give the same bytes. Pick-a-Pic convention: label_0/label_1 = 1.0 for the
preferred image, 0.0 for the other."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.cache import BytesLRU
from pipeline.decode import as_jpeg
from pipeline.ids import stable_key
from pipeline.shards import write_manifest, write_shards
from pipeline.splits import hash_split


def winner_side(pair_id: str, seed: int = 0) -> int:
    """0 or 1: where the winner goes. Deterministic, about half and half."""
    return int(stable_key("social-side", seed, pair_id)[:8], 16) & 1


def winner_sides(pair_ids, seed: int = 0) -> list[int]:
    """winner_side of each pair id, from one hash of the common prefix copied per id (the lowest
    bit of the first 8 hex digits is the lowest bit of the digest's 4th byte)."""
    prefix = hashlib.sha256(f"social-side\x1f{seed}\x1f".encode())
    sides = []
    for pair_id in pair_ids:
        h = prefix.copy()
        h.update(str(pair_id).encode())
        sides.append(h.digest()[3] & 1)
    return sides


IMAGE_CACHE_BYTES = 256 << 20  # JPEG bytes an export keeps in memory, whatever the images' sizes


class ImageBytes:
    """JPEG bytes and model by image id (info: image_id -> (path, model)). The bytes of the images
    recently paired are kept (least recently used dropped beyond max_bytes): pairs of one prompt
    come together, one image is in many pairs, and the four exports of a build share one
    ImageBytes, so each file is read about once (a small log's images all fit)."""

    def __init__(self, info: dict, max_bytes: int = IMAGE_CACHE_BYTES):
        self.info = info
        self.cache = BytesLRU(self._read, max_bytes)

    def _read(self, image_id: str) -> bytes:
        with open(self.info[image_id][0], "rb") as f:
            return as_jpeg(f.read())

    def get(self, image_id: str) -> bytes:
        return self.cache.get(image_id)

    def model(self, image_id: str) -> str:
        return self.info[image_id][1]


def image_bytes(images) -> ImageBytes:
    """An ImageBytes as given, or one over an image_id -> (path, model) dict."""
    return images if isinstance(images, ImageBytes) else ImageBytes(images)


def check_export_pairs(pairs: pa.Table) -> str:
    """The kind of an export's pairs ('population' or 'user'), after checking the export rules:
    one kind only; population pairs: each unordered image pair at most once; user pairs: user_id
    on every row and each (user, unordered pair) at most once. Raises ValueError otherwise."""
    kinds = set(pc.unique(pairs.column("kind")).to_pylist())
    if len(kinds) > 1:
        raise ValueError(f"one kind of pairs per export, got {sorted(kinds)}")
    kind = kinds.pop() if kinds else "population"
    if kind == "user" and pairs.column("user_id").null_count:
        raise ValueError("per-user pairs need a user_id on every row")
    if _distinct_unordered(pairs, kind):
        return kind
    users = pairs.column("user_id").to_pylist()  # a repeat (or a null uid): find the first, in order
    seen = set()
    for u, w, l in zip(users, pairs.column("winner_uid").to_pylist(), pairs.column("loser_uid").to_pylist()):
        key = (u if kind == "user" else None, min(w, l), max(w, l))
        if key in seen:
            raise ValueError(
                f"image pair {key[1:]} appears twice in a {kind} export" + (f" (user {u})" if u else "")
            )
        seen.add(key)
    return kind


def _distinct_unordered(pairs: pa.Table, kind: str) -> bool:
    """True when no (user for user pairs, unordered uid pair) repeats and no uid is null (Arrow
    compares strings bytewise: the same order as Python's min/max on str)."""
    w, l_ = pairs.column("winner_uid"), pairs.column("loser_uid")
    if w.null_count or l_.null_count:
        return False
    w_first = pc.less_equal(w, l_)
    keys = pa.table(
        {
            "user": pairs.column("user_id") if kind == "user" else pa.nulls(pairs.num_rows, pa.string()),
            "lo": pc.if_else(w_first, w, l_),
            "hi": pc.if_else(w_first, l_, w),
        }
    )
    return keys.group_by(["user", "lo", "hi"]).aggregate([]).num_rows == pairs.num_rows


def _sides(pairs: pa.Table, seed: int):
    """(row, side the winner goes to), a batch of rows at a time (never all pairs as Python objects);
    rows are built from the batch's columns (cheaper than RecordBatch.to_pylist's per-row dicts)."""
    names = pairs.column_names
    for batch in pairs.to_batches(max_chunksize=4_096):
        columns = [c.to_pylist() for c in batch.columns]
        sides = winner_sides(columns[names.index("pair_id")], seed)
        for values, side in zip(zip(*columns), sides):
            yield dict(zip(names, values)), side


_EVIDENCE = (
    "prob",
    "prob_margin",
    "winner_exposure",
    "loser_exposure",
    "winner_impressions",
    "loser_impressions",
    "winner_expected",
    "loser_expected",
    "winner_score",
    "loser_score",
    "winner_rate",
    "loser_rate",
    "sessions",
)


def split_of(prompt_group: str, eval_fraction: float, salt: str = "social-v1") -> str:
    """'eval' for a deterministic eval_fraction of prompt groups, else 'train'."""
    return hash_split(prompt_group, eval_fraction, salt)


def split_pairs(pairs: pa.Table, eval_fraction: float) -> dict[str, pa.Table]:
    """Pairs by split; a prompt group is wholly in one split."""
    is_eval: dict = {}  # by prompt group: many pairs share one
    for g in pairs.column("prompt_group").unique().to_pylist():
        is_eval[g] = split_of(g, eval_fraction) == "eval"
    mask = pa.array([is_eval[g] for g in pairs.column("prompt_group").to_pylist()], type=pa.bool_())
    return {"train": pairs.filter(pc.invert(mask)), "eval": pairs.filter(mask)}


def write_webdataset(
    pairs: pa.Table, image_info, out_dir: Path, cfg, stats: dict | None = None
) -> Path:
    """Per split (out_dir/train, out_dir/eval, split by prompt group): <pair_id>.0.jpg,
    <pair_id>.1.jpg, <pair_id>.json (caption, label_0, label_1, user_id, uids, image ids, kind,
    evidence) in social-<split>-NNNNNN.tar, plus a manifest.json in each split folder. One kind
    of pairs per call (check_export_pairs). image_info: an ImageBytes, or image_id -> (path, model)."""
    kind = check_export_pairs(pairs)
    cache = image_bytes(image_info)
    out_dir = Path(out_dir)
    for split, part in split_pairs(pairs, cfg.eval_fraction).items():
        _write_webdataset_split(part, cache, out_dir / split, split, kind, cfg, stats)
    return out_dir


def _placed(row: dict, side: int) -> tuple[list[str], list[str]]:
    """(image ids, uids) in sample order: the winner first unless it goes to side 1."""
    ids = [row["winner_image_id"], row["loser_image_id"]]
    uids = [row["winner_uid"], row["loser_uid"]]
    return (ids[::-1], uids[::-1]) if side == 1 else (ids, uids)


def _write_webdataset_split(pairs: pa.Table, cache, out_dir: Path, split: str, kind: str, cfg, stats) -> None:
    def samples():
        for row, side in _sides(pairs, cfg.seed):
            ids, uids = _placed(row, side)
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
                    "evidence": {k: row[k] for k in _EVIDENCE},
                    "split": split,
                },
            }

    prefix = "social-user" if kind == "user" else "social"
    shards = write_shards(
        samples(), out_dir, f"{prefix}-{split}", max_count=cfg.shard_max_count, max_bytes=cfg.shard_max_bytes
    )
    extra = {
        "split": split,
        "kind": kind,
        "counts": {k: v for k, v in (stats or {}).items() if isinstance(v, (int, float))},
    }
    write_manifest(
        out_dir,
        "social_pairs" if kind == "population" else "social_user_pairs",
        shards,
        cfg.to_dict(),
        extra=extra,
        version=(stats or {}).get("dataset_version"),
        split=split,
    )


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


def write_pickapic(pairs: pa.Table, image_info, out_dir: Path, cfg) -> Path:
    """Pick-a-Pic v2 columns in train-NNNNN-of-NNNNN.parquet and validation-NNNNN-of-NNNNN.parquet
    files under out_dir (split by prompt group), readable with
    datasets.load_dataset("parquet", data_dir=out_dir) (splits "train" and "validation") and
    therefore with diffusers' train_diffusion_dpo.py (--dataset_name=<out_dir>
    --dataset_split_name=train). A file holds at most shard_max_count rows or shard_max_bytes of
    images; a row group at most pickapic_row_group_rows rows or pickapic_row_group_bytes.
    image_info: an ImageBytes, or image_id -> (path, model)."""
    check_export_pairs(pairs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("train-*.parquet"), *out_dir.glob("validation-*.parquet")]:
        old.unlink()
    cache = image_bytes(image_info)
    parts = split_pairs(pairs, cfg.eval_fraction)
    for split, name in (("train", "train"), ("eval", "validation")):
        if parts[split].num_rows or split == "train":
            _write_pickapic_split(parts[split], cache, out_dir, name, cfg)
    return out_dir


def _pickapic_rows(pairs: pa.Table, cache: ImageBytes, seed: int):
    for row, side in _sides(pairs, seed):
        ids, uids = _placed(row, side)
        yield {
            "are_different": uids[0] != uids[1],
            "best_image_uid": row["winner_uid"],
            "caption": row["prompt"],
            "has_label": True,
            "image_0_uid": uids[0],
            "image_1_uid": uids[1],
            "jpg_0": cache.get(ids[0]),
            "jpg_1": cache.get(ids[1]),
            "label_0": 1.0 if side == 0 else 0.0,
            "label_1": 1.0 if side == 1 else 0.0,
            "model_0": cache.model(ids[0]),
            "model_1": cache.model(ids[1]),
            "ranking_id": int(row["pair_id"][:15], 16),
            "user_id": row["user_id"],
            "pair_id": row["pair_id"],
            "kind": row["kind"],
            "prob": row["prob"],
        }


def _chunks(rows: list[dict], max_rows: int, max_bytes: int) -> list[list[dict]]:
    """Consecutive runs of rows with at most max_rows rows and, unless one row alone is larger,
    at most max_bytes of jpg_0 + jpg_1."""
    out, cur, size = [], [], 0
    for r in rows:
        b = len(r["jpg_0"]) + len(r["jpg_1"])
        if cur and (len(cur) >= max_rows or size + b > max_bytes):
            out.append(cur)
            cur, size = [], 0
        cur.append(r)
        size += b
    if cur:
        out.append(cur)
    return out


def _write_pickapic_split(pairs: pa.Table, cache: ImageBytes, out_dir: Path, name: str, cfg) -> None:
    rows = list(_pickapic_rows(pairs, cache, cfg.seed))
    files = _chunks(rows, max(1, cfg.shard_max_count), cfg.shard_max_bytes) or [[]]
    for f, file_rows in enumerate(files):
        groups = _chunks(file_rows, cfg.pickapic_row_group_rows, cfg.pickapic_row_group_bytes)
        _write_row_groups(out_dir / f"{name}-{f:05d}-of-{len(files):05d}.parquet", groups)


def _write_row_groups(path: Path, groups: list[list[dict]]) -> None:
    """One Parquet row group per list of rows, written to a temporary name and renamed (readers
    never see half a file, like pipeline/storage.write_parquet_atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with pq.ParquetWriter(tmp, PICKAPIC_SCHEMA, compression="zstd") as w:
            if not groups:
                w.write_table(PICKAPIC_SCHEMA.empty_table())
            for g in groups:
                w.write_table(pa.Table.from_pylist(g, schema=PICKAPIC_SCHEMA), row_group_size=len(g))
        os.chmod(tmp, 0o644)  # a dataset file: readable by the team, like the shards
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
