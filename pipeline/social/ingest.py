"""Reading the social input folder: images (validated, hashed) and events (as DuckDB views)."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.config import SQL_DIR
from pipeline.ids import content_uid, stable_key
from pipeline.rejects import Rejects

IMAGE_COLUMNS = ("image_id", "path", "prompt", "prompt_id", "creator_id", "created_at", "model")
EVENT_COLUMNS = ("ts", "user_id", "image_id", "event", "event_id")
MAX_IMAGE_BYTES = 50_000_000
MAX_IMAGE_PIXELS = 100_000_000  # decompression-bomb guard


def load_sql(name: str) -> str:
    """The text of sql/<name>.sql (one query per file, named after what it produces)."""
    return (SQL_DIR / f"{name}.sql").read_text()


def _sql_str(value: str) -> str:
    """A SQL string literal. Used only to put file paths into read_parquet(...) when the events
    view is created (DuckDB cannot bind table-function arguments of a view as parameters)."""
    return "'" + str(value).replace("'", "''") + "'"


def find_inputs(social_dir: Path) -> tuple[list[Path], list[Path]]:
    """images.* and events*.* (Parquet or CSV) directly under social_dir, sorted by name."""
    social_dir = Path(social_dir)
    if not social_dir.is_dir():
        raise FileNotFoundError(f"social input folder not found: {social_dir}")
    ok = (".parquet", ".csv")
    images = sorted(p for p in social_dir.glob("images*") if p.is_file() and p.suffix in ok)
    events = sorted(p for p in social_dir.glob("events*") if p.is_file() and p.suffix in ok)
    if not images:
        raise FileNotFoundError(f"no images.parquet or images.csv in {social_dir}")
    return images, events


def user_in_log(social_dir: Path, user_id: str) -> bool:
    """Whether ``user_id`` acts (events' ``user_id``) or creates (images' ``creator_id``) anywhere in the
    log: a removal request for a user the log does not know would remove nothing."""
    images, events = find_inputs(social_dir)
    for path, column in [*((p, "creator_id") for p in images), *((p, "user_id") for p in events)]:
        t = pq.read_table(path, columns=[column]) if path.suffix == ".parquet" else read_log_table(path, (column,)).table
        if t is not None and column in t.column_names:
            col = pc.cast(t.column(column), pa.string())
            if pc.any(pc.equal(col, str(user_id))).as_py():
                return True
    return False


_PUNCT = re.compile(r"[^\w\s]|_")
_WS = re.compile(r"\s+")


def normalize_prompt(text: str | None) -> str:
    """Lowercase, punctuation stripped, whitespace collapsed: 'A red fox, at dawn!' -> 'a red fox at dawn'."""
    if text is None:
        return ""
    return _WS.sub(" ", _PUNCT.sub("", unicodedata.normalize("NFKC", str(text))).lower()).strip()


@dataclass
class LogTable:
    """One log file read tolerantly: its rows, the rows that could not be parsed, or why the whole
    file could not be read (then it counts as one input row, rejected)."""

    table: pa.Table | None
    bad_rows: list[tuple[int, str]]  # (row number, why) of rows skipped while parsing
    error: str | None = None


def read_log_table(path: Path, string_columns: tuple[str, ...] = ()) -> LogTable:
    """A Parquet or CSV log file. CSV rows that do not parse (a wrong number of fields) are skipped
    and listed; a file that cannot be read at all (not Parquet, invalid UTF-8, a bad footer or page)
    is reported whole. Never raises for bad content."""
    path = Path(path)
    try:
        if path.suffix == ".parquet":
            return LogTable(pq.read_table(path), [])
        import codecs

        decoder = codecs.getincrementaldecoder("utf-8")()
        with open(path, "rb") as f:  # invalid UTF-8 would reach the row handler undecodable
            for chunk in iter(lambda: f.read(1 << 20), b""):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        bad: list[tuple[int, str]] = []

        def skip(row) -> str:
            bad.append((int(row.number or 0), f"{row.actual_columns} fields, the header has {row.expected_columns}"))
            return "skip"

        t = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                strings_can_be_null=True, auto_dict_encode=False,
                column_types={n: pa.string() for n in string_columns},
            ),
            read_options=pacsv.ReadOptions(autogenerate_column_names=False),
            parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=skip),
        )
        return LogTable(t, bad)
    except (pa.ArrowException, OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        return LogTable(None, [], f"{type(e).__name__}: {str(e)[:200]}")


def _read_table(path: Path) -> pa.Table:
    """A log file's table, or an empty one when it cannot be read (see read_log_table)."""
    got = read_log_table(path, IMAGE_COLUMNS)
    return got.table if got.table is not None else pa.table({})


def _col(t: pa.Table, name: str, n: int) -> list:
    if name not in t.column_names:
        return [None] * n
    c = t.column(name)
    if name == "created_at":
        return c.to_pylist()
    return pc.cast(c, pa.string()).to_pylist()


def _to_timestamp(v):
    """A created_at value as numpy datetime64[us], None when empty, False when unparsable."""
    if v is None or v == "":
        return None
    try:
        if isinstance(v, str):
            v = v.strip()
            if v.endswith("Z") or re.search(r"[+-]\d\d:?\d\d$", v[10:]):
                import datetime as _dt

                d = _dt.datetime.fromisoformat(v)  # 3.11+ reads "Z" too
                return np.datetime64(d.astimezone(_dt.UTC).replace(tzinfo=None), "us")
            return np.datetime64(v.replace(" ", "T"), "us")
        if getattr(v, "tzinfo", None) is not None:  # aware datetimes compare in UTC, like the events
            import datetime as _dt

            v = v.astimezone(_dt.UTC).replace(tzinfo=None)
        return np.datetime64(v, "us")
    except (ValueError, TypeError):
        return False


def _readable_image(data: bytes) -> str | None:
    """None when the bytes decode as an image, else why not."""
    from PIL import Image

    try:
        import io

        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                return f"{im.width}x{im.height} exceeds the pixel limit"
            im.verify()
        return None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a reject, never a crash
        msg = re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc))  # no memory addresses: rejects stay deterministic
        return f"{type(exc).__name__}: {msg}"[:200]


@dataclass
class ImagesResult:
    table: pa.Table  # accepted images
    rejected_ids: list[str]
    rows_in: int
    # reposts: image_id of a copy (same bytes as an accepted image) -> the image its events count
    # for, with the copy's creator (their events on the copy are self-engagement too)
    copies: pa.Table | None = None


def load_images(
    social_dir: Path, image_files: list[Path], rejects: Rejects, window_days: int | None = None,
    removed_creators: set[str] | None = None,
) -> ImagesResult:
    """Validate images.*: ids unique, prompt present, file readable; hash the bytes into uid and
    compute prompt_group. Bad rows go to rejects; the first row of a duplicated image_id wins."""
    social_dir = Path(social_dir).resolve()
    out = {
        k: []
        for k in (
            "image_id",
            "path",
            "prompt",
            "prompt_id",
            "prompt_key",
            "prompt_group",
            "creator_id",
            "created_at",
            "model",
            "uid",
            "bytes",
            "src",
        )
    }
    seen: set[str] = set()
    rejected: list[str] = []
    rows_in = 0
    for f in image_files:
        got = read_log_table(f, IMAGE_COLUMNS)
        if got.table is None:
            rows_in += 1
            rejects.add(f.name, "unreadable log file", got.error or "")
            continue
        for number, why in got.bad_rows:
            rows_in += 1
            rejects.add(f"{f.name}:line{number}", "malformed row", why)
        t = got.table
        n = t.num_rows
        rows_in += n
        cols = {c: _col(t, c, n) for c in IMAGE_COLUMNS}
        for r in range(n):
            src = f"{f.name}:{r}"
            iid, path, prompt = cols["image_id"][r], cols["path"][r], cols["prompt"][r]
            if not iid:
                rejects.add(src, "missing image id", "image_id is empty")
                continue
            if iid in seen:
                rejects.add(src, "duplicate image id", f"image_id={iid} (first row kept)")
                continue
            seen.add(iid)
            creator = cols["creator_id"][r]
            if removed_creators and creator is not None and hashlib.sha256(str(creator).encode()).hexdigest() in removed_creators:
                rejects.add(src, "removed on request", f"image_id={iid}: its creator asked to be removed")
                rejected.append(iid)
                continue
            if prompt is None or not str(prompt).strip():
                rejects.add(src, "missing prompt", f"image_id={iid}")
                rejected.append(iid)
                continue
            created = _to_timestamp(cols["created_at"][r])
            if created is False:
                rejects.add(
                    src, "unparsable timestamp", f"image_id={iid} created_at={cols['created_at'][r]!r}"
                )
                rejected.append(iid)
                continue
            p = Path(path) if path else None
            if p is not None and not p.is_absolute():
                p = social_dir / p
            if p is None or not p.is_file():
                rejects.add(src, "missing image file", f"image_id={iid} path={path!r}")
                rejected.append(iid)
                continue
            if p.stat().st_size > MAX_IMAGE_BYTES:
                rejects.add(
                    src, "unreadable image", f"image_id={iid}: file larger than {MAX_IMAGE_BYTES} bytes"
                )
                rejected.append(iid)
                continue
            data = p.read_bytes()
            uid = content_uid(data)
            why = _readable_image(data)
            if why is not None:
                rejects.add(src, "unreadable image", f"image_id={iid}: {why}", uid=uid)
                rejected.append(iid)
                continue
            pid = cols["prompt_id"][r]
            key = f"id:{pid}" if pid else f"text:{normalize_prompt(prompt)}"
            if window_days and created is not None:
                day = int(created.astype("datetime64[D]").astype(np.int64))
                key += f"|w{day // window_days}"
            out["image_id"].append(iid)
            out["path"].append(str(p))
            out["prompt"].append(str(prompt))
            out["prompt_id"].append(pid)
            out["prompt_key"].append(key)
            out["prompt_group"].append(stable_key("prompt_group", key)[:16])
            out["creator_id"].append(cols["creator_id"][r])
            out["created_at"].append(created)
            out["model"].append(cols["model"][r])
            out["uid"].append(uid)
            out["bytes"].append(len(data))
            out["src"].append(src)
    copies = _fold_reposts(out, rejects)
    table = pa.table(
        {
            "image_id": pa.array(out["image_id"], pa.string()),
            "path": pa.array(out["path"], pa.string()),
            "prompt": pa.array(out["prompt"], pa.string()),
            "prompt_id": pa.array(out["prompt_id"], pa.string()),
            "prompt_key": pa.array(out["prompt_key"], pa.string()),
            "prompt_group": pa.array(out["prompt_group"], pa.string()),
            "creator_id": pa.array(out["creator_id"], pa.string()),
            "created_at": pa.array(out["created_at"], pa.timestamp("us")),
            "model": pa.array(out["model"], pa.string()),
            "uid": pa.array(out["uid"], pa.string()),
            "file_bytes": pa.array(out["bytes"], pa.int64()),
        }
    )
    return ImagesResult(table, rejected, rows_in, copies)


def _fold_reposts(out: dict, rejects: Rejects) -> pa.Table:
    """Reposts: rows whose bytes equal an earlier image's (same uid under another image_id). The
    original (earliest created_at, then smallest image_id) stays; each copy is removed from `out`
    and rejected as "duplicate image content", and its events are counted for the original (the
    same picture's engagement, pooled; a user who saw both counts once). Without this, two
    image_ids of one picture make two pairs of the same image pair in an export."""
    by_uid: dict[str, list[int]] = {}
    for j, uid in enumerate(out["uid"]):
        by_uid.setdefault(uid, []).append(j)
    drop: dict[int, int] = {}
    for rows in by_uid.values():
        if len(rows) < 2:
            continue
        def key(j):
            c = out["created_at"][j]
            return (c is None, c if c is not None else 0, out["image_id"][j])
        first, *rest = sorted(rows, key=key)
        for j in rest:
            drop[j] = first
    copy_ids, canon_ids, copy_creators = [], [], []
    for j, first in sorted(drop.items()):
        iid, orig = out["image_id"][j], out["image_id"][first]
        rejects.add(
            out["src"][j],
            "duplicate image content",
            f"image_id={iid}: same bytes as image_id={orig}; its events count for {orig}",
            uid=out["uid"][j],
        )
        copy_ids.append(iid)
        canon_ids.append(orig)
        copy_creators.append(out["creator_id"][j])
    if drop:
        for k, values in out.items():
            out[k] = [v for j, v in enumerate(values) if j not in drop]
    return pa.table(
        {
            "image_id": pa.array(copy_ids, pa.string()),
            "canonical_id": pa.array(canon_ids, pa.string()),
            "creator_id": pa.array(copy_creators, pa.string()),
        }
    )


def register_events(
    con: duckdb.DuckDBPyConnection, social_dir: Path, event_files: list[Path], stratum_column: str | None,
    rejects: Rejects | None = None,
) -> int:
    """Create the view events_src(_file, _row, ts, ts_raw, user_id, image_id, event, event_id, stratum)
    over all event files. Parquet is scanned lazily by DuckDB (file name + file_row_number give the
    row's source); CSV files are read with pyarrow as text (for exact row numbers) and registered.
    Paths enter the SQL as quoted literals (see _sql_str), nothing else is templated.

    A file that cannot be read at all, and CSV rows that do not parse, go to ``rejects`` ("unreadable
    log file", one row per file; "malformed row") and stay out of the view; returns how many rejects
    that made."""
    parts = []
    n_rejected = 0
    readable = []
    csv_tables = {}
    for f in event_files:
        string_cols = tuple(n for n in (*EVENT_COLUMNS, stratum_column or "") if n)
        got = read_log_table(f, string_cols)
        if got.table is None:
            n_rejected += 1
            if rejects is not None:
                rejects.add(f.name, "unreadable log file", got.error or "")
            continue
        for number, why in got.bad_rows:
            n_rejected += 1
            if rejects is not None:
                rejects.add(f"{f.name}:line{number}", "malformed row", why)
        readable.append(f)
        if f.suffix == ".csv":
            csv_tables[f] = got.table
    pq_files = [f for f in readable if f.suffix == ".parquet"]
    csv_files = [f for f in readable if f.suffix == ".csv"]

    def select(src: str, cols: set[str], file_expr: str, row_expr: str, ts_is_text: bool) -> str:
        def c(name):
            return f"CAST({name} AS VARCHAR)" if name in cols else "CAST(NULL AS VARCHAR)"

        # text goes through TIMESTAMPTZ so that '...+02:00' / '...Z' offsets are honoured (the
        # session time zone is UTC, so naive text is read as UTC); native timestamps cast directly
        if "ts" not in cols:
            ts = "CAST(NULL AS TIMESTAMP)"
        elif ts_is_text:
            ts = "TRY_CAST(TRY_CAST(ts AS TIMESTAMPTZ) AS TIMESTAMP)"
        else:
            ts = "TRY_CAST(ts AS TIMESTAMP)"
        ts_raw = "CAST(ts AS VARCHAR)" if "ts" in cols else "CAST(NULL AS VARCHAR)"
        strat = f"coalesce({c(stratum_column)}, '')" if stratum_column else "''"
        event = f"lower(trim({c('event')}))"
        return (
            f"SELECT {file_expr} AS _file, {row_expr} AS _row, {ts} AS ts, {ts_raw} AS ts_raw, "
            f"{c('user_id')} AS user_id, {c('image_id')} AS image_id, {event} AS event, "
            f"{c('event_id')} AS event_id, {strat} AS stratum FROM {src}"
        )

    if pq_files:
        cols: set[str] = set()
        ts_is_text = False
        for f in pq_files:
            schema = pq.read_schema(f)
            cols |= set(schema.names)
            if "ts" in schema.names and not pa.types.is_timestamp(schema.field("ts").type):
                ts_is_text = True
        files = ", ".join(_sql_str(f) for f in pq_files)
        src = f"read_parquet([{files}], filename = true, file_row_number = true, union_by_name = true)"
        parts.append(select(src, cols, "parse_filename(filename)", "file_row_number", ts_is_text))
    for j, f in enumerate(csv_files):
        t = csv_tables[f]
        t = t.append_column("_csv_row", pa.array(np.arange(t.num_rows, dtype=np.int64)))
        name = f"_events_csv_{j}"
        con.register(name, t)
        parts.append(select(name, set(t.column_names), _sql_str(f.name), "_csv_row", True))
    if not parts:
        con.execute(
            "CREATE OR REPLACE TEMP VIEW events_src AS SELECT CAST(NULL AS VARCHAR) AS _file, 0::BIGINT AS _row, "
            "CAST(NULL AS TIMESTAMP) ts, CAST(NULL AS VARCHAR) ts_raw, CAST(NULL AS VARCHAR) user_id, "
            "CAST(NULL AS VARCHAR) image_id, CAST(NULL AS VARCHAR) event, CAST(NULL AS VARCHAR) event_id, "
            "'' AS stratum WHERE false"
        )
        return n_rejected
    con.execute("CREATE OR REPLACE TEMP VIEW events_src AS " + " UNION ALL ".join(f"({p})" for p in parts))
    return n_rejected
