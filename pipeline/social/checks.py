"""Checks of a written social build, each comparing two independent measurements.

- events_reconcile: the rows of the input files, counted without DuckDB (Parquet footers,
  the csv module), against what the builder wrote: accepted events per image
  (social_images.events_accepted) plus the reject rows of the events files, read back from disk.
  Images likewise: input rows against social_images rows plus image reject rows.
- no_self_pairs: the written exports re-read (Parquet rows, tar members): no pair whose two
  images are the same (same uid, or byte-identical JPEGs).
- shards_match_manifest: every shard re-read and hashed against its manifest, and each export's
  row count (tar members, Parquet footers) against the pairs table read back from disk.
- contradicting_pairs: image pairs that appear with both winners in an export (the default
  export must have none).

Each returns a CheckOutcome(passed, metadata); the asset turns them into asset checks.
"""

from __future__ import annotations

import csv
import hashlib
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.shards import read_manifest, verify_manifest
from pipeline.social.ingest import find_inputs

EXPORTS = {  # kind -> (webdataset folder, Pick-a-Pic folder), relative to the build folder
    "population": ("webdataset", "pickapic"),
    "user": ("per_user/webdataset", "per_user/pickapic"),
}


@dataclass
class CheckOutcome:
    passed: bool
    metadata: dict = field(default_factory=dict)


def count_rows(path: Path) -> int:
    """Input rows of one file, read without DuckDB and without pyarrow's CSV reader: a Parquet file's
    rows (all its pages read), a CSV file's records by the csv module (header and blank lines not
    counted). A file that cannot be read at all counts as one input (the builder rejects it whole)."""
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            return pq.read_table(path).num_rows
        except Exception:  # noqa: BLE001 - unreadable: one reject for the whole file
            return 1
    try:
        with open(path, newline="", encoding="utf-8", errors="strict") as f:
            records = sum(1 for row in csv.reader(f) if row)
    except (UnicodeDecodeError, csv.Error):
        return 1
    return max(records - 1, 0)


def events_reconcile(social_dir: Path, out_dir: Path) -> CheckOutcome:
    """events in the files = accepted + rejected, and image rows in = accepted + rejected, with
    'in' counted from the input files and the rest read back from the written tables."""
    image_files, event_files = find_inputs(Path(social_dir))
    events_in = sum(count_rows(f) for f in event_files)
    image_rows_in = sum(count_rows(f) for f in image_files)
    out_dir = Path(out_dir)
    images = pq.read_table(out_dir / "social_images.parquet", columns=["events_accepted"])
    accepted = int(sum(v or 0 for v in images.column("events_accepted").to_pylist()))
    sources = (
        pq.read_table(out_dir / "social_rejects.parquet", columns=["source"]).column("source").to_pylist()
    )
    event_names = {f.name for f in event_files}
    image_names = {f.name for f in image_files}
    files = [s.rsplit(":", 1)[0] for s in sources]
    ev_rejected = sum(1 for f in files if f in event_names)
    img_rejected = sum(1 for f in files if f in image_names)
    unattributed = len(files) - ev_rejected - img_rejected
    meta = {
        "events_in_files": events_in,
        "events_accepted_written": accepted,
        "events_rejected_written": ev_rejected,
        "image_rows_in_files": image_rows_in,
        "images_written": images.num_rows,
        "images_rejected_written": img_rejected,
        "rejects_of_unknown_files": unattributed,
    }
    passed = (
        events_in == accepted + ev_rejected
        and image_rows_in == images.num_rows + img_rejected
        and unattributed == 0
    )
    return CheckOutcome(passed, meta)


def _tar_samples(shard: Path):
    """{key: {ext: bytes}} of one tar, read back member by member."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tf:
        for m in tf.getmembers():
            if not m.isfile():
                continue
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _pickapic_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.parquet"))


def no_self_pairs(out_dir: Path) -> CheckOutcome:
    """Pairs whose two images are the same, counted in the pairs table and in every export,
    re-read from disk (uids, and sha256 of the JPEG bytes that trainers will read)."""
    out_dir = Path(out_dir)
    found: dict[str, int] = {}
    t = pq.read_table(out_dir / "social_pairs.parquet", columns=["winner_uid", "loser_uid"])
    found["social_pairs"] = sum(
        1 for a, b in zip(t.column("winner_uid").to_pylist(), t.column("loser_uid").to_pylist()) if a == b
    )
    for wds_dir, pp_dir in EXPORTS.values():
        n = 0
        for f in _pickapic_files(out_dir / pp_dir):
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(
                columns=["image_0_uid", "image_1_uid", "jpg_0", "jpg_1"], batch_size=256
            ):
                d = batch.to_pydict()
                for u0, u1, j0, j1 in zip(d["image_0_uid"], d["image_1_uid"], d["jpg_0"], d["jpg_1"]):
                    n += u0 == u1 or _sha(j0) == _sha(j1)
        found[f"{pp_dir}"] = n
        n = 0
        for split_dir in sorted((out_dir / wds_dir).glob("*/manifest.json")):
            for s in read_manifest(split_dir.parent)["shards"]:
                for members in _tar_samples(split_dir.parent / s["name"]).values():
                    meta = json.loads(members.get("json", b"{}"))
                    same_uid = meta.get("uid_0") is not None and meta.get("uid_0") == meta.get("uid_1")
                    n += same_uid or _sha(members.get("0.jpg", b"0")) == _sha(members.get("1.jpg", b"1"))
        found[f"{wds_dir}"] = n
    return CheckOutcome(sum(found.values()) == 0, {"self_pairs": found})


def shards_match_manifest(out_dir: Path) -> CheckOutcome:
    """Every shard against its manifest (present, sha256, samples counted from the tar), and for
    each kind of pairs: WebDataset samples (counted in the tars), Pick-a-Pic rows (Parquet
    footers) and the pairs table read back must all hold the same number of pairs."""
    out_dir = Path(out_dir)
    problems: dict[str, list[str]] = {}
    counts: dict[str, dict[str, int]] = {}
    kinds = pq.read_table(out_dir / "social_pairs.parquet", columns=["kind"]).column("kind").to_pylist()
    for kind, (wds_dir, pp_dir) in EXPORTS.items():
        c = {"pairs_table": sum(1 for k in kinds if k == kind)}
        wds_root = out_dir / wds_dir
        if wds_root.exists():
            samples = 0
            for split_dir in sorted(p.parent for p in wds_root.glob("*/manifest.json")):
                found = verify_manifest(split_dir)
                if found:
                    problems[str(split_dir.relative_to(out_dir))] = found
                for s in read_manifest(split_dir)["shards"]:
                    p = split_dir / s["name"]
                    if p.exists():
                        with tarfile.open(p) as tf:
                            samples += len({n.split(".", 1)[0] for n in tf.getnames()})
            c["webdataset_samples"] = samples
        if (out_dir / pp_dir).exists():
            c["pickapic_rows"] = sum(
                pq.ParquetFile(f).metadata.num_rows for f in _pickapic_files(out_dir / pp_dir)
            )
        counts[kind] = c
        if len(set(c.values())) > 1:
            problems.setdefault(kind, []).append(f"{kind} pairs: counts differ {c}")
    return CheckOutcome(not problems, {"problems": problems, "counts": counts})


def contradicting_pairs(winners, losers, users=None) -> dict:
    """How many rows belong to image pairs (per user when users is given) that appear with both
    winners, how many distinct unordered pairs there are, and how many of those contradict."""
    users = users if users is not None else [None] * len(winners)
    seen: dict[tuple, set] = {}
    rows_of: dict[tuple, int] = {}
    for u, w, l in zip(users, winners, losers):
        key = (u, min(w, l), max(w, l))
        seen.setdefault(key, set()).add(w)
        rows_of[key] = rows_of.get(key, 0) + 1
    bad = [k for k, v in seen.items() if len(v) > 1]
    return {
        "rows": len(winners),
        "distinct_pairs": len(seen),
        "contradicting_pairs": len(bad),
        "rows_in_contradicting_pairs": sum(rows_of[k] for k in bad),
        "max_rows_per_pair": max(rows_of.values(), default=0),
    }


def read_pickapic_winners(folder: Path, split: str = "train") -> dict:
    """winner uid, loser uid and user_id of every row of one split of a Pick-a-Pic export, read
    back from the Parquet files (label_0 = 1.0 means image 0 won)."""
    w, l_, u = [], [], []
    for f in sorted(Path(folder).glob(f"{split}-*.parquet")):
        t = pq.read_table(f, columns=["image_0_uid", "image_1_uid", "label_0", "user_id"]).to_pydict()
        for a, b, lab, user in zip(t["image_0_uid"], t["image_1_uid"], t["label_0"], t["user_id"]):
            w.append(a if lab == 1.0 else b)
            l_.append(b if lab == 1.0 else a)
            u.append(user)
    return {"winner_uid": w, "loser_uid": l_, "user_id": u}
