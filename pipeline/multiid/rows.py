"""The multi-identity builder's rows and shards: the candidates / pairs tables' schemas and the part files a
selection streams its rows to, their merge in target order, the similarity histograms, and the WebDataset
records of a bucket's samples (target photo + reference crops)."""

from __future__ import annotations

import bisect
import io
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.decode import encode_jpeg
from pipeline.multiid.config import MultiIDConfig
from pipeline.multiid.rules import crop_box

SIM_BINS = np.round(np.linspace(-1.0, 1.0, 201), 4)  # 0.01 wide
PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff"}


def _r(x: float, n: int = 6) -> float:
    return round(float(x), n)


def _image_ext(data: bytes) -> str:
    """The member extension of a photo's bytes: the format Pillow reads in them. JPEG and PNG are told by the
    signatures Pillow checks (opening each target photo was 1.5 of a refresh's CPU-s at 100k faces); a JPEG
    holding an MPF segment, which Pillow reads as MPO, is left to Pillow."""
    from PIL import Image

    if data[:3] == b"\xff\xd8\xff" and b"MPF\x00" not in data:
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    with Image.open(io.BytesIO(data)) as im:
        return PIL_EXT.get(im.format or "", "img")


def ref_crop(data: bytes, bbox, margin: float, max_side: int, quality: int) -> tuple[bytes, list[float], list[float]]:
    """JPEG face crop: bbox grown by ``margin`` on each side, squared, clipped; (bytes, crop_box, bbox_in_crop)."""
    from PIL import Image

    from pipeline.decode import upright

    with Image.open(io.BytesIO(data)) as im0:
        im = upright(im0).convert("RGB")
    x1, y1, x2, y2 = (float(v) for v in bbox)
    box = crop_box(bbox, margin, *im.size)
    crop = im.crop(tuple(box))
    s = 1.0
    if max(crop.size) > max_side:
        s = max_side / max(crop.size)
        crop = crop.resize((max(1, round(crop.size[0] * s)), max(1, round(crop.size[1] * s))), Image.LANCZOS)
    in_crop = [_r((x1 - box[0]) * s, 2), _r((y1 - box[1]) * s, 2), _r((x2 - box[0]) * s, 2), _r((y2 - box[1]) * s, 2)]
    return encode_jpeg(crop, quality), [float(v) for v in box], in_crop


def _hist(values, bins=SIM_BINS) -> dict:
    return _hist_from_counts(np.histogram(np.asarray(values, dtype=np.float64), bins=bins)[0], bins)


def _hist_counts(values, bins=SIM_BINS) -> dict[str, int]:
    """The non-zero bins of a histogram, by bin index (JSON-friendly, additive over buckets)."""
    counts = np.histogram(np.asarray(values, dtype=np.float64), bins=bins)[0]
    return {str(int(i)): int(counts[i]) for i in np.nonzero(counts)[0]}


def _hist_from_counts(counts, bins=SIM_BINS) -> dict:
    edges = np.asarray(bins, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    nz = np.nonzero(counts)[0]
    return {"bin_edges": [float(e) for e in edges], "counts": [int(c) for c in counts], "nonzero": {f"{edges[i]:.2f}": int(counts[i]) for i in nz}}


CANDIDATE_SCHEMA = pa.schema([
    ("target_uid", pa.string()), ("target_face_index", pa.int32()), ("identity_id", pa.string()),
    ("ref_uid", pa.string()), ("ref_face_index", pa.int32()), ("similarity", pa.float32()),
    ("image_hamming", pa.int32()), ("face_hamming", pa.int32()), ("face_ncc", pa.float32()),
    ("kp_inliers", pa.int32()), ("kp_ratio", pa.float32()),
    ("ref_quality", pa.float32()), ("pose_diff", pa.float32()), ("score", pa.float32()), ("status", pa.string()),
])
PAIRS_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("target_uid", pa.string()), ("target_face_index", pa.int32()),
    ("identity_id", pa.string()), ("ref_rank", pa.int32()), ("ref_member", pa.string()), ("ref_uid", pa.string()),
    ("ref_face_index", pa.int32()), ("similarity", pa.float32()), ("theta_tr", pa.float32()),
    ("image_hamming", pa.int32()), ("face_hamming", pa.int32()), ("face_ncc", pa.float32()),
    ("kp_inliers", pa.int32()), ("kp_ratio", pa.float32()),
    ("target_quality", pa.float32()), ("ref_quality", pa.float32()), ("pose_diff", pa.float32()),
    ("yaw_diff", pa.float32()), ("pitch_diff", pa.float32()), ("score", pa.float32()),
    ("n_candidates", pa.int32()), ("n_survivors", pa.int32()), ("backend", pa.string()), ("model_version", pa.string()),
])
CANDIDATE_BATCH = 20_000  # candidate (and pair) rows turned into an Arrow table and written at a time
MERGE_BATCH = 16_384  # rows read at a time from each part file when the parts are merged in target order
QUALITY_COLUMNS = ["similarity", "theta_tr", "pose_diff", "face_hamming", "image_hamming", "face_ncc", "ref_quality"]  # data_quality


class _RowParts:
    """One selection run's candidate and pair rows, appended to two Parquet part files as they are
    produced (in the order :func:`_select` visits targets: by target uid). ``paths[name]`` is None while
    no row of that table was written."""

    def __init__(self, folder: Path, stem: str):
        self.folder, self.stem = folder, stem
        self.paths: dict[str, Path | None] = {"pairs": None, "candidates": None}
        self._writers: dict = {}

    def write(self, name: str, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        from pipeline.storage import named_write_error

        try:
            if name not in self._writers:
                self.paths[name] = self.folder / f"{self.stem}-{name}.parquet"
                self._writers[name] = pq.ParquetWriter(self.paths[name], table.schema, compression="zstd")
            self._writers[name].write_table(table)
        except OSError as e:  # a full disk names the part file it was writing
            raise named_write_error(self.folder / f"{self.stem}-{name}.parquet", e) from e

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers = {}


class _TakenRows:
    """A table's rows in order, each either a previous row (its index in the table it came from) or a new one
    (a dict), written ``CANDIDATE_BATCH`` rows at a time: the previous rows are sliced from their table, in
    runs of consecutive rows, not rebuilt from dicts (a refresh keeps most of the rows of the targets it
    derives or selects again), and the new ones made into one table a batch at a time (taking each re-selected
    target's rows apart, with a table of its own new rows each, was 5 sampled CPU-s of a 1% refresh at 100k)."""

    def __init__(self, schema: pa.Schema, write):
        self.schema, self.write = schema, write
        self.runs: list[list] = []  # [a previous table (in ``schema``), or None for ``new``; first row; rows]
        self.new: list[dict] = []
        self.n = 0

    def add(self, table: pa.Table | None, rows: list) -> None:
        """Rows in order: an int is row ``table[i]``, a dict a new row."""
        runs, new = self.runs, self.new
        last = runs[-1] if runs else None
        for r in rows:
            if isinstance(r, int):
                if last is not None and last[0] is table and last[1] + last[2] == r:
                    last[2] += 1
                else:
                    last = [table, r, 1]
                    runs.append(last)
            else:
                if last is not None and last[0] is None:
                    last[2] += 1
                else:
                    last = [None, len(new), 1]
                    runs.append(last)
                new.append(r)
        self.n += len(rows)
        if self.n >= CANDIDATE_BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.runs:
            return
        made = pa.Table.from_pylist(self.new, schema=self.schema) if self.new else None
        self.write(pa.concat_tables([(made if t is None else t).slice(first, n) for t, first, n in self.runs]).combine_chunks())
        self.runs, self.new, self.n = [], [], 0


def _part_batches(path: Path | None, schema: pa.Schema, uids: pa.Array | None = None):
    """The rows of a part file (or of a previous version's table), a batch at a time, cast to
    ``schema``; with ``uids``, only the rows of those targets."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if path is None:
        return
    f = pq.ParquetFile(path)
    groups = None if uids is None else _row_groups_holding(f, sorted(uids.to_pylist()))
    if groups is not None and not groups:
        return
    for batch in f.iter_batches(batch_size=MERGE_BATCH, columns=schema.names, row_groups=groups):
        t = pa.Table.from_batches([batch])
        if uids is not None:  # filtered before the cast: a refresh wants a few targets' rows of the whole table
            t = t.filter(pc.is_in(t.column("target_uid"), uids))
        if t.num_rows:
            yield t.select(schema.names).cast(schema)


def _row_groups_holding(f, uids: list[str]) -> list[int] | None:
    """The row groups of Parquet file ``f`` whose target_uid range (from the footer's statistics) holds one of
    ``uids`` (sorted); a group without statistics is kept. None when every group is kept. A refresh derives a
    bucket's few changed targets from the previous version's tables, whose targets are spread over all of them:
    each bucket read and decompressed the whole table (5.1M candidate rows at 100k faces) for a handful of rows."""
    md = f.metadata
    leaves = [i for i in range(md.num_columns) if md.schema.column(i).path == "target_uid"]
    if not leaves:
        return None
    col = leaves[0]
    keep = []
    for g in range(md.num_row_groups):
        st = md.row_group(g).column(col).statistics
        if st is None or not st.has_min_max:
            keep.append(g)
            continue
        lo, hi = st.min, st.max
        if not (isinstance(lo, str) and isinstance(hi, str)):  # statistics not read as text: not trusted
            keep.append(g)
            continue
        i = bisect.bisect_left(uids, lo)
        if i < len(uids) and uids[i] <= hi:
            keep.append(g)
    return None if len(keep) == md.num_row_groups else keep


def _rows_by_target(tables):
    """(target uid, its rows as dicts) from tables of rows in target order (a table's rows per target
    contiguous, targets ascending), one target's rows held at a time."""
    cur, rows = None, []
    for t in tables:
        for r in t.to_pylist():
            u = r["target_uid"]
            if u != cur:
                if cur is not None:
                    if u < cur:
                        raise RuntimeError(f"rows of target {u!r} after those of {cur!r}: not in target order")
                    yield cur, rows
                cur, rows = u, []
            rows.append(r)
    if cur is not None:
        yield cur, rows


class _Uids:
    """A sorted uid column as a sequence for :mod:`bisect` (a few scalars read, not the column compared)."""

    def __init__(self, col):
        self.col = col

    def __len__(self) -> int:
        return len(self.col)

    def __getitem__(self, i: int) -> str:
        return self.col[i].as_py()


EVEN_BATCH_ROWS = 65_536  # the tables' rows reach the Parquet writer in batches of this many


def _even_batches(tables, rows: int = EVEN_BATCH_ROWS):
    """``tables`` again, cut into contiguous batches of ``rows`` rows (the last one shorter). Parquet's writer
    falls back from dictionary to plain encoding at a point that depends on where its input's chunks end, so
    the same rows in other pieces (a refresh's reused rows, a parallel build's chunks) gave other bytes (seen
    at 10k faces: candidates.parquet of a refresh and of a fresh build, same rows, different files)."""
    buf, n = [], 0
    for t in tables:
        if not t.num_rows:
            continue
        buf.append(t)
        n += t.num_rows
        while n >= rows:
            whole = pa.concat_tables(buf)
            yield whole.slice(0, rows).combine_chunks()
            rest = whole.slice(rows)
            buf, n = [rest], rest.num_rows
    if n:
        yield pa.concat_tables(buf).combine_chunks()


def _merge_in_target_order(sources: list, schema: pa.Schema):
    """:func:`_merge_tables_in_target_order` in even batches (:func:`_even_batches`): the file written from them
    depends only on the rows."""
    return _even_batches(_merge_tables_in_target_order(sources, schema))


def _merge_tables_in_target_order(sources: list, schema: pa.Schema):
    """Tables in the order of one run over the collection (by target uid, stable: each target's rows
    keep their order), from ``sources``, iterators of tables each sorted by target uid, where all rows of
    a target come from one source (a bucket, or a previous version). Yields pieces; holds about one
    batch per source, not the whole table."""
    import pyarrow.compute as pc

    its = [iter(s) for s in sources]
    bufs: list[pa.Table | None] = [None] * len(its)
    done = [False] * len(its)

    def pull(i: int) -> None:
        nxt = next(its[i], None)
        if nxt is None:
            done[i] = True
        else:
            bufs[i] = nxt if bufs[i] is None or not bufs[i].num_rows else pa.concat_tables([bufs[i], nxt])

    for i in range(len(its)):
        pull(i)
    while True:
        for i in range(len(its)):
            while not done[i] and (bufs[i] is None or not bufs[i].num_rows):
                pull(i)
        live = [i for i in range(len(its)) if bufs[i] is not None and bufs[i].num_rows]
        if not live:
            return
        # rows below the smallest "last uid read so far" of the sources not exhausted are final: no
        # source can still produce a smaller uid (a target's rows may continue in the next batch)
        lasts = [(bufs[i].column("target_uid")[-1].as_py(), i) for i in live if not done[i]]
        bound = min(lasts)[0] if lasts else None
        pieces = []
        for i in live:
            b = bufs[i]
            k = b.num_rows if bound is None else bisect.bisect_left(_Uids(b.column("target_uid")), bound)
            if k:
                pieces.append(b.slice(0, k))
                bufs[i] = b.slice(k)
        if pieces:
            t = pa.concat_tables(pieces)
            yield t.take(pc.sort_indices(t, sort_keys=[("target_uid", "ascending")])) if len(pieces) > 1 else t
        for last, i in lasts:
            if last == bound:
                pull(i)


def _shard_samples(samples: list[dict], cfg: MultiIDConfig, read_bytes, kept=None):
    """WebDataset records, one at a time (the bytes of one sample in memory, not the dataset's). ``kept``
    (guard_cache.FaceFeatures): the references' crops made by earlier builds, and where those made here
    are kept (a crop depends only on the photo's bytes, the face box and the crop settings)."""
    crop_settings = f"{cfg.crop_margin!r}|{cfg.crop_max_side!r}|{cfg.jpeg_quality!r}"
    for s in samples:
        data = read_bytes(s["target"]["uid"])
        ext = _image_ext(data)
        s["target"]["member"] = f"target.{ext}"
        rec = {"__key__": s["key"], f"target.{ext}": data}
        cache: dict[str, bytes] = {}

        def photo(uid: str, cache=cache) -> bytes:
            return cache.get(uid) or cache.setdefault(uid, read_bytes(uid))

        for fj in s["faces"]:
            for r in fj["refs"]:
                if cfg.ref_mode == "crop":
                    def make(r=r) -> tuple:
                        return ref_crop(photo(r["uid"]), r["bbox"], cfg.crop_margin, cfg.crop_max_side, cfg.jpeg_quality)

                    box_key = ",".join(f"{float(v)!r}" for v in r["bbox"])
                    crop, box, in_crop = make() if kept is None else kept.get(
                        "crop", r["uid"], [], make, extra=f"{box_key}|{crop_settings}")
                    r["crop_box"], r["bbox_in_crop"], r["kind"] = box, in_crop, "face_crop"
                    rec[r["member"]] = crop
                else:
                    rb = photo(r["uid"])
                    rext = _image_ext(rb)
                    r["member"] = r["member"].rsplit(".", 1)[0] + f".{rext}"
                    r["kind"] = "image"
                    rec[r["member"]] = rb
        rec["json"] = s
        yield rec


class _RecordSpill:
    """One selection run's shard records (:func:`_shard_samples`: the target photo, the references' crops,
    the sample JSON), made as each sample is selected, in the process that selected it (its photos' bytes
    still cached there; the parent then only writes the tars), and appended to one spill file.
    ``at[key]`` = (file, offset, length) of a sample's record, read back by :func:`_spilled_records`."""

    def __init__(self, folder: Path, stem: str, cfg: MultiIDConfig, kept=None):
        self.path = folder / f"{stem}-records.bin"
        self.cfg = cfg
        self.kept = kept  # guard_cache.FaceFeatures: the references' crops kept across builds
        self.at: dict[str, tuple[Path, int, int]] = {}
        self._f = None
        self._end = 0

    def add(self, sample: dict, read_bytes) -> None:
        import pickle

        from pipeline.shards import encode_member
        from pipeline.storage import named_write_error

        (rec,) = _shard_samples([sample], self.cfg, read_bytes, self.kept)
        rec["json"] = encode_member("json", rec["json"])  # here, in parallel, not in the process writing the tars
        data = pickle.dumps(rec, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            if self._f is None:
                self._f = open(self.path, "wb")  # noqa: SIM115 - closed in close()
            self._f.write(data)
        except OSError as e:  # a full disk names the spill file
            raise named_write_error(self.path, e) from e
        self.at[sample["key"]] = (self.path, self._end, len(data))
        self._end += len(data)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _slim_sample(sample: dict) -> dict:
    """What the plan uses of a sample whose record is already made (its key, split, target photo, and per
    person the identity and how many references): a few hundred bytes instead of tens of KB."""
    return {"key": sample["key"], "split": sample["split"], "target": {"uid": sample["target"]["uid"]},
            "faces": [{"identity_id": fj["identity_id"], "refs": [None] * len(fj["refs"])} for fj in sample["faces"]]}


def _spilled_records(samples: list[dict], at: dict):
    """The records of ``samples`` (in their order) from the spill files that ``at`` locates, one at a time."""
    import pickle

    files: dict[Path, object] = {}
    try:
        for s in samples:
            path, offset, length = at[s["key"]]
            f = files.get(path) or files.setdefault(path, open(path, "rb"))  # noqa: SIM115 - closed below
            f.seek(offset)
            yield pickle.loads(f.read(length))
    finally:
        for f in files.values():
            f.close()


def hf_features(config: MultiIDConfig, samples: list[dict] | None = None, target_exts=("jpg", "png", "webp")):
    """datasets.Features for ``load_dataset("webdataset", ..., features=...)``.

    Samples carry a varying number of ``ref_<i>.jpg`` members (1..max_faces x refs_per_person) and a
    target extension that follows the original bytes, which defeats HF's feature inference from the
    first 5 samples; declare every possible member instead (missing ones load as None). HF decodes
    ``.json`` members to dicts: pass the dataset's ``samples`` (``MultiIDResult.samples`` or
    ``metrics.load_samples(dir)``) to type that column from them; without them it is left untyped.
    """
    import datasets

    feats = {f"target.{e}": datasets.Image() for e in target_exts}
    for i in range(config.max_faces * config.refs_per_person):
        feats[f"ref_{i}.jpg"] = datasets.Image()
    if samples:
        schema = pa.Table.from_pylist([{"json": s} for s in samples]).schema
        feats["json"] = datasets.Features.from_arrow_schema(schema)["json"]
    else:
        feats["json"] = datasets.Value("string")
    feats["__key__"] = datasets.Value("string")
    feats["__url__"] = datasets.Value("string")
    return datasets.Features(feats)
