"""Fuzzing the social log reader: mutated CSV and Parquet event and image files through
build_social_pairs. Nothing may raise, and every row of the input files ends accepted or rejected:
the social_dataset check (pipeline.social.checks.events_reconcile, which counts the files' rows without
DuckDB) must pass on whatever was written. Budget as tests/test_fuzz_inputs.py (FUZZ_EXAMPLES,
FUZZ_RANDOM=1 for `make fuzz`)."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.decode import encode_jpeg
from pipeline.social import SocialConfig, build_social_pairs
from pipeline.social.checks import events_reconcile

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(max_examples=EXAMPLES or 60, derandomize=os.environ.get("FUZZ_RANDOM") != "1", database=None,
                deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
CFG = SocialConfig(min_exposure=2, export_webdataset=False, export_pickapic=False)
EVENTS = ["impression", "click", "like", "save", "share", "remix"]

odd_text = st.one_of(
    st.sampled_from(["", " ", "NULL", "nan", "None", "0", "-1", "1e309", "2026-13-45", "yesterday", "😀", "a,b",
                     'he said "hi"', "line\nbreak", "\x00", "Ä" * 300, "LIKE", "Impression ", "remix\t"]),
    st.text(max_size=12),
    st.integers(-10**12, 10**12).map(str),
)


def _valid(tmp: Path, n_images: int = 6, n_events: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    files = tmp / "files"
    files.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(n_images):
        p = files / f"im{i}.jpg"
        p.write_bytes(encode_jpeg(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)))
        images.append({"image_id": f"im{i}", "path": f"files/im{i}.jpg", "prompt": f"prompt {i % 2}",
                       "creator_id": f"c{i % 3}", "created_at": "2026-11-01 00:00:00", "model": "m"})
    events = [{"ts": f"2026-11-0{2 + j % 7} 10:{j % 60:02d}:00", "user_id": f"u{rng.integers(0, 9)}",
               "image_id": f"im{rng.integers(0, n_images)}", "event": EVENTS[int(rng.integers(0, 6))],
               "event_id": f"e{j}", "surface": ["explore", "following"][j % 2]} for j in range(n_events)]
    return images, events


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})


def _check(social: Path, out: Path) -> None:
    res = build_social_pairs(social, out, CFG)
    outcome = events_reconcile(social, out)
    assert outcome.passed, outcome.metadata
    s = res.stats
    assert s["events_in"] == s["events_accepted"] + s["events_rejected"]


@FUZZ
@given(data=st.data())
def test_mutated_csv_logs_end_accepted_or_rejected(data):
    with tempfile.TemporaryDirectory() as d:
        social = Path(d) / "social"
        social.mkdir()
        images, events = _valid(social)
        for _ in range(data.draw(st.integers(0, 8), label="event cells")):
            row = events[data.draw(st.integers(0, len(events) - 1))]
            row[data.draw(st.sampled_from(list(row)))] = data.draw(odd_text)
        for _ in range(data.draw(st.integers(0, 4), label="image cells")):
            row = images[data.draw(st.integers(0, len(images) - 1))]
            row[data.draw(st.sampled_from(list(row)))] = data.draw(odd_text)
        ev_cols = ["ts", "user_id", "image_id", "event", "event_id", "surface"]
        im_cols = ["image_id", "path", "prompt", "creator_id", "created_at", "model"]
        if data.draw(st.booleans(), label="drop an optional column"):
            ev_cols.remove(data.draw(st.sampled_from(["event_id", "surface"])))
        _write_csv(social / "images.csv", images, im_cols)
        _write_csv(social / "events-2026-11-02.csv", events, ev_cols)
        tail = data.draw(st.sampled_from([b"", b"\n\n", b"x,y\n", b"\xff\xfe\x00garbage", b'"unterminated\n']), label="tail")
        with open(social / "events-2026-11-02.csv", "ab") as f:
            f.write(tail)
        _check(social, Path(d) / "out")


@FUZZ
@given(data=st.data())
def test_mutated_parquet_logs_end_accepted_or_rejected(data):
    with tempfile.TemporaryDirectory() as d:
        social = Path(d) / "social"
        social.mkdir()
        images, events = _valid(social)
        table = pa.Table.from_pylist(events)
        kind = data.draw(st.sampled_from(["types", "nulls", "flip", "truncate"]), label="mutation")
        if kind == "types":  # a column of another type
            col = data.draw(st.sampled_from(table.column_names))
            values = data.draw(st.sampled_from([
                pa.array(range(table.num_rows), pa.int64()), pa.array([1.5] * table.num_rows),
                pa.array([[1, 2]] * table.num_rows), pa.array([b"\xff\x00"] * table.num_rows, pa.binary()),
                pa.array([True] * table.num_rows)]))
            table = table.set_column(table.column_names.index(col), col, values)
        elif kind == "nulls":
            col = data.draw(st.sampled_from(table.column_names))
            table = table.set_column(table.column_names.index(col), col, pa.nulls(table.num_rows, table.schema.field(col).type))
        pq.write_table(pa.Table.from_pylist(images), social / "images.parquet")
        buf = io.BytesIO()
        pq.write_table(table, buf)
        raw = bytearray(buf.getvalue())
        if kind == "flip":
            for _ in range(data.draw(st.integers(1, 6))):
                raw[data.draw(st.integers(4, max(5, len(raw) - 9)))] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        (social / "events-2026-11-02.parquet").write_bytes(bytes(raw))
        _check(social, Path(d) / "out")


def test_a_log_file_that_is_not_a_table_is_rejected_whole(tmp_path):
    social = tmp_path / "social"
    social.mkdir()
    images, events = _valid(social)
    _write_csv(social / "images.csv", images, list(images[0]))
    _write_csv(social / "events-1.csv", events, list(events[0]))
    (social / "events-2.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
    res = build_social_pairs(social, tmp_path / "out", CFG)
    assert res.stats["events_accepted"] > 0
    reasons = res.stats["rejects_by_reason"]
    assert reasons.get("unreadable log file", 0) >= 1, reasons
    assert events_reconcile(social, tmp_path / "out").passed


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
