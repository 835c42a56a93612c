import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.ids import content_uid
from pipeline.ingest import IngestLimits, ingest_partition
from pipeline.sources import count_partition_inputs, iter_partition, load_registry, register_new_inputs
from pipeline.storage import write_parquet_atomic


def _jpeg_bytes(seed: int, size=(48, 64)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.type = kind
    info.linkname = linkname
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_uid_is_content_hash_and_stable():
    a = _jpeg_bytes(1)
    assert content_uid(a) == content_uid(bytes(a)) and len(content_uid(a)) == 32
    assert content_uid(a) != content_uid(_jpeg_bytes(2))


def test_folder_batches_are_registered_once_and_stay_stable(tmp_path):
    inp, reg = tmp_path / "in", tmp_path / "reg"
    (inp / "sub").mkdir(parents=True)
    for i in range(5):
        (inp / "sub" / f"img{i}.jpg").write_bytes(_jpeg_bytes(i))
    (inp / "sub" / "img0.txt").write_text("a caption")  # sidecar, not an input
    first = register_new_inputs(inp, reg, batch_size=2)
    assert [s.key for s in first] == ["files-000000", "files-000001", "files-000002"]
    assert register_new_inputs(inp, reg, batch_size=2) == []  # idempotent
    (inp / "new.png").write_bytes(_jpeg_bytes(9))
    later = register_new_inputs(inp, reg, batch_size=2)
    assert len(later) == 1 and later[0].members == ("new.png",)
    assert [s.members for s in load_registry(reg)][:3] == [s.members for s in first]
    recs = list(iter_partition(first[0]))
    assert recs[0].meta.get("caption") == "a caption"


def test_tar_safety_and_offsets(tmp_path):
    inp, reg = tmp_path / "in", tmp_path / "reg"
    inp.mkdir()
    good = _jpeg_bytes(3)
    with tarfile.open(inp / "shard-0001.tar", "w") as tf:
        _add(tf, "000001.jpg", good)
        _add(tf, "000001.json", b'{"caption": "two people", "url": "http://x/y.jpg"}')
        _add(tf, "000001.txt", b"ignored because json has a caption")
        _add(tf, "../escape.jpg", good)
        _add(tf, "/etc/passwd.jpg", good)
        _add(tf, "link.jpg", b"", kind=tarfile.SYMTYPE, linkname="/etc/passwd")
        _add(tf, "000002.pickle", b"\x80\x04N.")
        _add(tf, "000003.json", b"{}")
    (spec,) = register_new_inputs(inp, reg)
    assert spec.kind == "tar" and spec.key == "tar-shard-0001"
    res = ingest_partition(spec)
    assert res.accepted == 1
    row = res.images.to_pylist()[0]
    assert row["source"] == "shard-0001.tar/000001" and row["caption"] == "two people"
    assert (inp / "shard-0001.tar").read_bytes()[row["offset"] : row["offset"] + row["length"]] == good
    reasons = res.rejects.counts_by_reason()
    assert reasons["unsafe tar member"] == 3
    assert reasons["member not ingested"] == 1  # 000002's pickle is never decoded; it is that sample's one reject
    assert reasons["sample has no image"] == 1  # 000003 (only json)
    assert res.reconciles()
    assert count_partition_inputs(spec) == res.accepted + len(res.rejects) == 6


def test_parquet_manifest_and_missing_files(tmp_path):
    inp, reg = tmp_path / "in", tmp_path / "reg"
    (inp / "imgs").mkdir(parents=True)
    (inp / "imgs" / "a.jpg").write_bytes(_jpeg_bytes(4))
    pq.write_table(
        pa.table({"path": ["imgs/a.jpg", "imgs/missing.jpg", None], "caption": ["c", None, None]}),
        inp / "manifest.parquet",
    )
    specs = register_new_inputs(inp, reg)
    man = next(s for s in specs if s.kind == "parquet")
    res = ingest_partition(man)
    assert res.accepted == 1 and res.images.column("caption").to_pylist() == ["c"]
    assert set(res.rejects.counts_by_reason()) == {"file not found", "empty path"}
    assert res.reconciles()


def test_bad_files_are_rejected_with_reasons_and_duplicates_counted(tmp_path):
    inp, reg = tmp_path / "in", tmp_path / "reg"
    inp.mkdir()
    img = _jpeg_bytes(5)
    (inp / "a.jpg").write_bytes(img)
    (inp / "b_copy.jpg").write_bytes(img)
    (inp / "c.jpg").write_bytes(b"not really a jpeg")
    (inp / "d.jpg").write_bytes(b"")
    (inp / "e.gif").write_bytes(b"GIF89a")
    (inp / "notes.md").write_text("hello")
    (spec,) = register_new_inputs(inp, reg, batch_size=100)
    res = ingest_partition(spec)
    assert res.accepted == 1 and res.duplicates == 1
    reasons = res.rejects.counts_by_reason()
    assert reasons == {"duplicate image": 1, "not an image": 1, "empty file": 1, "unsupported file type": 2}
    assert res.inputs == 6 and res.reconciles()


def test_cross_partition_duplicates_belong_to_the_earliest_partition(tmp_path):
    """Each partition is ingested on its own; whichever finishes first, the collection keeps one copy of
    the same bytes, from the partition registered first, and reports the other as a duplicate."""
    from pipeline.catalog import query, refresh_catalog
    from pipeline.collection import load_collection
    from pipeline.commits import commit_unit
    from pipeline.config import Layout
    from pipeline.faces.stage import faces_schema
    from pipeline.storage import write_parquet_atomic

    layout = Layout(tmp_path / "home")
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "a.jpg").write_bytes(_jpeg_bytes(6))
    (first,) = register_new_inputs(inp, layout.partitions)
    (inp / "z_same_bytes.jpg").write_bytes(_jpeg_bytes(6))
    (second,) = register_new_inputs(inp, layout.partitions)
    r2 = ingest_partition(second)  # the later partition finishes first
    r1 = ingest_partition(first)
    assert r1.accepted == r2.accepted == 1 and r1.reconciles() and r2.reconciles()
    for spec, res in ((second, r2), (first, r1)):
        write_parquet_atomic(res.images, layout.partition_file("images", spec.key))
        commit_unit(layout, "faces", spec.key, {"faces": faces_schema(128).empty_table()})
    coll = load_collection(layout)
    assert coll.images.column("uid").to_pylist() == [content_uid(_jpeg_bytes(6))]
    assert coll.images.column("partition").to_pylist() == [first.key]
    refresh_catalog(layout)
    assert query(layout, "SELECT count(*) AS n FROM images").column("n")[0].as_py() == 1
    dup = query(layout, "SELECT source, reason, partition FROM rejects").to_pylist()
    assert dup == [{"source": "z_same_bytes.jpg", "reason": "duplicate image", "partition": second.key}]
    # re-running the first partition is unaffected by the later one
    again = ingest_partition(first)
    assert again.images.equals(r1.images)


def test_one_collection_one_face_model(tmp_path):
    """Partitions embedded by two face models are refused with a message that names them."""
    import pytest

    from pipeline.collection import MixedFaceModels, load_collection
    from pipeline.commits import commit_unit
    from pipeline.config import Layout
    from pipeline.faces.stage import faces_schema
    from pipeline.storage import write_parquet_atomic

    layout = Layout(tmp_path / "home")
    inp = tmp_path / "in"
    inp.mkdir()
    keys = []
    for i, (backend, dim) in enumerate((("dlib", 128), ("insightface", 512))):
        (inp / f"p{i}.jpg").write_bytes(_jpeg_bytes(20 + i))
        (spec,) = register_new_inputs(inp, layout.partitions)
        keys.append(spec.key)
        write_parquet_atomic(ingest_partition(spec).images, layout.partition_file("images", spec.key))
        row = {"uid": "u", "source": "s", "face_index": 0, "x1": 0.0, "y1": 0.0, "x2": 1.0, "y2": 1.0, "landmarks": [0.0] * 10,
               "det_score": 1.0, "face_width": 1.0, "face_height": 1.0, "blur": 1.0, "yaw": 0.0, "pitch": 0.0, "roll": 0.0,
               "embedding": [1.0] + [0.0] * (dim - 1), "backend": backend, "model_version": f"{backend}-m",
               "image_width": 1, "image_height": 1}
        commit_unit(layout, "faces", spec.key, {"faces": pa.Table.from_pylist([row], schema=faces_schema(dim))})
    with pytest.raises(MixedFaceModels, match="one collection, one face model") as e:
        load_collection(layout)
    assert keys[0] in str(e.value) and keys[1] in str(e.value) and "512-d" in str(e.value)


# ---------------------------------------------------------------- limits checked before reading

LIMIT = 1_000_000


def _sparse(path, size):
    """A file that claims `size` bytes and takes no disk space: reading it would take minutes and
    `size` bytes of memory, so a reader that reads before checking would be caught."""
    with open(path, "wb") as f:
        f.truncate(size)


@pytest.fixture
def reads(monkeypatch):
    """Every (path, offset, length) read through pipeline.sources.read_bytes; reading a file of more
    than LIMIT bytes fails the test instead of filling memory."""
    from pipeline import sources

    seen, real = [], sources.read_bytes

    def spy(path, offset, length):
        seen.append((path, offset, length))
        assert length <= LIMIT, f"read {length} bytes of {path} past the {LIMIT}-byte limit"
        return real(path, offset, length)

    monkeypatch.setattr(sources, "read_bytes", spy)
    return seen


def test_oversized_loose_file_is_rejected_unread(tmp_path, reads):
    inp = tmp_path / "in"
    inp.mkdir()
    _sparse(inp / "huge.jpg", 64 * 2**30)  # 64 GiB
    (inp / "small.jpg").write_bytes(_jpeg_bytes(11))
    (spec,) = register_new_inputs(inp, tmp_path / "reg")
    res = ingest_partition(spec, IngestLimits(max_bytes=LIMIT))
    assert res.accepted == 1
    (reject,) = res.rejects.rows
    assert reject["source"] == "huge.jpg" and reject["reason"] == "file too large" and str(64 * 2**30) in reject["detail"]
    assert [r[0] for r in reads] == [str(inp / "small.jpg")]


def test_oversized_manifest_row_is_rejected_unread(tmp_path, reads):
    inp = tmp_path / "in"
    (inp / "imgs").mkdir(parents=True)
    _sparse(inp / "imgs" / "huge.png", 64 * 2**30)
    (inp / "imgs" / "ok.jpg").write_bytes(_jpeg_bytes(12))
    pq.write_table(pa.table({"path": ["imgs/huge.png", "imgs/ok.jpg"]}), inp / "m.parquet")
    spec = next(s for s in register_new_inputs(inp, tmp_path / "reg") if s.kind == "parquet")
    res = ingest_partition(spec, IngestLimits(max_bytes=LIMIT))
    assert res.accepted == 1 and res.rejects.counts_by_reason() == {"file too large": 1}
    assert [r[0] for r in reads] == [str((inp / "imgs" / "ok.jpg").resolve())]


def test_oversized_tar_member_is_rejected_unread(tmp_path, reads):
    inp = tmp_path / "in"
    inp.mkdir()
    with tarfile.open(inp / "s.tar", "w") as tf:
        _add(tf, "a.jpg", _jpeg_bytes(13))
        _add(tf, "b.jpg", _jpeg_bytes(14))
    raw = bytearray((inp / "s.tar").read_bytes())
    # b.jpg's header (after a.jpg's header and data) claims 8 GiB - 1: the data is not there at all
    b_header = 512 + (len(_jpeg_bytes(13)) + 511) // 512 * 512
    raw[b_header + 124 : b_header + 136] = b"77777777777\0"
    raw[b_header + 148 : b_header + 156] = b" " * 8
    raw[b_header + 148 : b_header + 156] = b"%06o\0 " % sum(raw[b_header : b_header + 512])
    (inp / "s.tar").write_bytes(bytes(raw))
    (spec,) = register_new_inputs(inp, tmp_path / "reg")
    res = ingest_partition(spec, IngestLimits(max_bytes=LIMIT))
    assert res.accepted == 1
    assert res.rejects.counts_by_reason()["file too large"] == 1
    assert count_partition_inputs(spec) == res.accepted + len(res.rejects)


@pytest.mark.timeout(60)  # a reader that opens the FIFO blocks forever
def test_fifo_and_folder_are_never_opened(tmp_path):
    inp = tmp_path / "in"
    (inp / "imgs").mkdir(parents=True)
    os.mkfifo(inp / "imgs" / "pipe.jpg")
    (inp / "imgs" / "folder.jpg").mkdir()
    pq.write_table(pa.table({"path": ["imgs/pipe.jpg", "imgs/folder.jpg", "/dev/zero.jpg"]}), inp / "m.parquet")
    spec = next(s for s in register_new_inputs(inp, tmp_path / "reg") if s.kind == "parquet")
    res = ingest_partition(spec, IngestLimits(manifest_roots=("/dev",)))
    assert res.accepted == 0
    assert res.rejects.counts_by_reason() == {"not a regular file": 2, "file not found": 1}


# ---------------------------------------------------------------- manifest paths stay inside their roots


def _manifest_world(tmp_path):
    """in/m.parquet with imgs/ beside it; elsewhere/ outside the input; a link inside pointing out."""
    inp, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    (inp / "imgs" / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    (inp / "imgs" / "in.jpg").write_bytes(_jpeg_bytes(21))
    (elsewhere / "out.jpg").write_bytes(_jpeg_bytes(22))
    os.symlink(elsewhere / "out.jpg", inp / "imgs" / "link-out.jpg")
    os.symlink(inp / "imgs" / "in.jpg", inp / "imgs" / "link-in.jpg")
    return inp, elsewhere


def _ingest_manifest(tmp_path, inp, paths, limits=None):
    pq.write_table(pa.table({"path": paths}), inp / "m.parquet")
    spec = next(s for s in register_new_inputs(inp, tmp_path / "reg") if s.kind == "parquet")
    res = ingest_partition(spec, limits or IngestLimits(manifest_roots=()))
    assert count_partition_inputs(spec) == res.accepted + len(res.rejects)
    return res


def test_manifest_paths_outside_are_refused(tmp_path):
    inp, elsewhere = _manifest_world(tmp_path)
    res = _ingest_manifest(tmp_path, inp, [
        str(elsewhere / "out.jpg"),  # absolute, elsewhere
        "../elsewhere/out.jpg",  # '..' escape
        "imgs/../../elsewhere/out.jpg",  # '..' escape through a real folder
        "imgs/link-out.jpg",  # a symlink inside that leads out
        "/etc/passwd.jpg",
    ])
    assert res.accepted == 0
    assert res.rejects.counts_by_reason() == {"path outside allowed roots": 5}
    assert all(str(elsewhere) not in (r.get("path") or "") for r in res.images.to_pylist())


def test_manifest_paths_inside_are_read(tmp_path):
    inp, _ = _manifest_world(tmp_path)
    res = _ingest_manifest(tmp_path, inp, [
        "imgs/in.jpg",
        str(inp / "imgs" / "in.jpg"),  # absolute but inside: a duplicate of the first
        "imgs/sub/../in.jpg",  # a '..' that stays inside
        "imgs/link-in.jpg",  # a link that stays inside: read at its real path
    ])
    assert res.accepted == 1 and res.duplicates == 3
    assert res.images.column("path").to_pylist() == [str((inp / "imgs" / "in.jpg").resolve())]


def test_configured_roots_allow_more(tmp_path, monkeypatch):
    inp, elsewhere = _manifest_world(tmp_path)
    paths = [str(elsewhere / "out.jpg"), "imgs/link-out.jpg"]
    monkeypatch.setenv("LINEUP_MANIFEST_ROOTS", os.pathsep.join(["/nonexistent", str(elsewhere)]))
    res = _ingest_manifest(tmp_path, inp, paths, IngestLimits())  # the default reads the environment
    assert res.accepted == 1 and res.duplicates == 1  # both lead to the same file
    monkeypatch.delenv("LINEUP_MANIFEST_ROOTS")
    res = _ingest_manifest(tmp_path / "again", inp, paths, IngestLimits(manifest_roots=(str(elsewhere),)))
    assert res.accepted == 1


def test_manifest_rows_of_the_wrong_type_are_rejected(tmp_path):
    inp, _ = _manifest_world(tmp_path)
    pq.write_table(pa.table({"path": pa.array([1, 2], pa.int64()), "caption": ["a", "b"]}), inp / "ints.parquet")
    pq.write_table(pa.table({"path": pa.array([b"imgs/in.jpg", b"\xff.jpg"], pa.binary()),
                             "caption": pa.array([{"k": 1}, None])}), inp / "bytes.parquet")
    specs = {s.key: s for s in register_new_inputs(inp, tmp_path / "reg") if s.kind == "parquet"}
    ints = ingest_partition(specs["parquet-ints"])
    assert ints.accepted == 0 and ints.rejects.counts_by_reason() == {"bad path value": 2}
    got = ingest_partition(specs["parquet-bytes"])
    assert got.accepted == 1 and got.rejects.counts_by_reason() == {"bad path value": 1}
    assert got.images.column("caption").to_pylist() == ['{"k": 1}']  # a struct caption, kept as JSON text


# ---------------------------------------------------------------- odd tar shards and file names


def test_tar_duplicates_odd_sidecars_and_a_bad_header(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    with tarfile.open(inp / "s.tar", "w") as tf:
        _add(tf, "k1.jpg", _jpeg_bytes(31))
        _add(tf, "k1.json", b'{"caption": 5, "url": ["x"]}')  # not text: kept as text
        _add(tf, "k1.jpg", _jpeg_bytes(32))  # the same name twice
        _add(tf, "k2.jpg", _jpeg_bytes(33))
        _add(tf, "k2.json", b"[" * 100_000 + b"]" * 100_000)  # deeper than the JSON parser recurses
        _add(tf, "k3.jpg", _jpeg_bytes(34))
        _add(tf, "k4.jpg", _jpeg_bytes(35))
    raw = bytearray((inp / "s.tar").read_bytes())
    # break k4.jpg's header: tarfile stops listing there without an error
    k4 = raw.index(b"k4.jpg")
    raw[k4 + 148 : k4 + 156] = b"0000000\0"
    (inp / "s.tar").write_bytes(bytes(raw))
    (spec,) = register_new_inputs(inp, tmp_path / "reg")
    res = ingest_partition(spec)
    captions = {r["source"]: r["caption"] for r in res.images.to_pylist()}
    assert captions == {"s.tar/k1": "5", "s.tar/k2": None, "s.tar/k3": None}
    reasons = res.rejects.counts_by_reason()
    assert reasons == {"duplicate tar member": 1, "corrupt tar": 1}  # k4 is not silently lost
    assert count_partition_inputs(spec) == res.accepted + len(res.rejects) == 5


def test_file_names_that_are_not_utf8(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / os.fsdecode(b"caf\xe9.jpg")).write_bytes(_jpeg_bytes(41))  # Latin-1 name
    (inp / "ok.jpg").write_bytes(_jpeg_bytes(42))
    with tarfile.open(inp / "s.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        _add(tf, os.fsdecode(b"\xff.jpg"), _jpeg_bytes(43))
    specs = register_new_inputs(inp, tmp_path / "reg")
    files = ingest_partition(next(s for s in specs if s.kind == "files"))
    assert files.accepted == 1 and files.rejects.counts_by_reason() == {"file name not UTF-8": 1}
    assert files.rejects.rows[0]["source"] == "caf\\udce9.jpg"
    shard = ingest_partition(next(s for s in specs if s.kind == "tar"))
    assert shard.accepted == 1 and shard.images.column("source").to_pylist() == ["s.tar/\\udcff"]
    for res in (files, shard):  # both tables can be written
        write_parquet_atomic(res.images, tmp_path / "t" / "images.parquet")
        write_parquet_atomic(res.rejects.to_table(), tmp_path / "t" / "rejects.parquet")


# ---------------------------------------------------------------- hostile loose entries (issue 21)


def test_a_non_utf8_name_is_refused_unwritten_and_the_registry_stays_readable(tmp_path):
    import duckdb

    inp, reg = tmp_path / "in", tmp_path / "reg"
    inp.mkdir()
    bad = inp / os.fsdecode(b"bad\xff.jpg")
    bad.write_bytes(_jpeg_bytes(51))
    (inp / "ok.jpg").write_bytes(_jpeg_bytes(52))
    (spec,) = register_new_inputs(inp, reg)
    # DuckDB (the catalog's reader of the registry) must parse every registry file
    rows = duckdb.sql(f"SELECT key, seq FROM read_json('{reg}/*.json', columns = {{'key': 'VARCHAR', 'seq': 'BIGINT'}})").fetchall()
    assert rows == [(spec.key, 0)]
    assert spec.members == ("ok.jpg",) and spec.refused_names == ("bad\\udcff.jpg",)
    res = ingest_partition(spec)
    assert res.accepted == 1 and res.rejects.counts_by_reason() == {"file name not UTF-8": 1}
    assert count_partition_inputs(spec) == res.accepted + len(res.rejects) == 2
    bad.unlink()  # a later run neither registers it again nor fails
    assert register_new_inputs(inp, reg) == []


def test_a_registry_written_with_a_non_utf8_name_is_repaired(tmp_path):
    """A registry file as earlier versions wrote it (the name as a lone surrogate escape) is rewritten
    on the next registration, with the same reject as before, and the catalog's reader parses it."""
    import duckdb

    from pipeline.sources import register_partitions

    inp, reg = tmp_path / "in", tmp_path / "reg"
    inp.mkdir()
    (inp / "ok.jpg").write_bytes(_jpeg_bytes(53))
    (inp / "caf\udce9.jpg").write_bytes(_jpeg_bytes(59))
    reg.mkdir()
    old = {"key": "files-000000", "kind": "files", "root": str(inp), "path": "", "seq": 0,
           "members": ["caf\udce9.jpg", "ok.jpg"]}
    (reg / "files-000000.json").write_text(json.dumps(old, indent=1, sort_keys=True))
    with pytest.raises(duckdb.InvalidInputException):  # what broke every later run
        duckdb.sql(f"SELECT key FROM read_json('{reg}/*.json', columns = {{'key': 'VARCHAR'}})").fetchall()
    before = ingest_partition(load_registry(reg)[0])
    register_partitions(reg, [])
    assert duckdb.sql(f"SELECT key FROM read_json('{reg}/*.json', columns = {{'key': 'VARCHAR'}})").fetchall() == [("files-000000",)]
    (spec,) = load_registry(reg)
    after = ingest_partition(spec)
    assert after.rejects.rows == before.rejects.rows and after.accepted == before.accepted == 1
    assert spec.refused_names == ("caf\\udce9.jpg",)


def test_folders_a_thousand_levels_deep_are_listed(tmp_path):
    inp = tmp_path / "in"
    deep = str(inp)
    os.mkdir(deep)
    for _ in range(1000):  # one level at a time: os.makedirs itself recurses once per level
        deep = os.path.join(deep, "d")
        os.mkdir(deep)
    with open(os.path.join(deep, "deep.jpg"), "wb") as f:
        f.write(_jpeg_bytes(54))
    (inp / "top.jpg").write_bytes(_jpeg_bytes(55))
    try:
        (spec,) = register_new_inputs(inp, tmp_path / "reg")
        res = ingest_partition(spec)
        assert res.accepted == 2 and len(res.rejects) == 0
    finally:  # pytest's own clean-up (shutil.rmtree) recurses once per level: empty it bottom-up here
        os.unlink(os.path.join(deep, "deep.jpg"))
        while deep != str(inp):
            os.rmdir(deep)
            deep = os.path.dirname(deep)


@pytest.mark.timeout(60)  # reading the FIFO or /dev/zero would never end
def test_every_odd_loose_entry_is_rejected_with_a_reason(tmp_path):
    inp, outside = tmp_path / "in", tmp_path / "outside"
    inp.mkdir()
    outside.mkdir()
    (outside / "o.jpg").write_bytes(_jpeg_bytes(56))
    (outside / "dir").mkdir()
    (inp / "ok.jpg").write_bytes(_jpeg_bytes(57))
    os.symlink(outside / "o.jpg", inp / "link-out.jpg")
    os.symlink(inp / "ok.jpg", inp / "z-link-in.jpg")  # inside: read (a duplicate of ok.jpg here)
    os.symlink("/dev/zero", inp / "zero.jpg")
    os.symlink("loop.jpg", inp / "loop.jpg")
    os.symlink(inp / "gone.jpg", inp / "dangling.jpg")
    os.symlink(outside / "dir", inp / "dirlink")
    os.symlink(outside / "o.jpg", inp / "out.tar")  # not opened as a shard
    os.mkfifo(inp / "fifo.jpg")
    (inp / "x.jpg").mkdir()
    (inp / "x.jpg" / "in-x.jpg").write_bytes(_jpeg_bytes(58))
    (inp / "ok.txt").symlink_to(outside / "o.jpg")  # a caption sidecar that leads out is not read
    (spec,) = register_new_inputs(inp, tmp_path / "reg")
    res = ingest_partition(spec)
    by_source = {r["source"]: r["reason"] for r in res.rejects.rows}
    assert by_source == {
        "link-out.jpg": "link outside the input folder",
        "z-link-in.jpg": "duplicate image",
        "zero.jpg": "link outside the input folder",
        "loop.jpg": "broken link",
        "dangling.jpg": "broken link",
        "dirlink": "link outside the input folder",
        "out.tar": "link outside the input folder",
        "fifo.jpg": "not a regular file",
        "x.jpg": "not a regular file",
    }
    assert all(r["detail"] for r in res.rejects.rows)
    assert sorted(res.images.column("source").to_pylist()) == ["ok.jpg", "x.jpg/in-x.jpg"]
    assert res.images.column("caption").to_pylist() == [None, None]
    assert count_partition_inputs(spec) == res.accepted + len(res.rejects) == 11


def test_a_folder_that_cannot_be_listed_is_one_reject(tmp_path, monkeypatch):
    """Root may read any folder, so the refusal is injected where os.scandir would raise it."""
    from pipeline import sources

    inp = tmp_path / "in"
    for sub in ("locked", "locked.jpg"):
        (inp / sub).mkdir(parents=True)
        (inp / sub / "a.jpg").write_bytes(_jpeg_bytes(60))
    (inp / "ok.jpg").write_bytes(_jpeg_bytes(61))
    real_scandir = os.scandir

    def refuse(path):
        if os.path.basename(str(path)).startswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(sources.os, "scandir", refuse)
    (spec,) = register_new_inputs(inp, tmp_path / "reg")
    assert spec.members == ("locked", "locked.jpg", "ok.jpg")
    res = ingest_partition(spec)
    assert {r["source"]: r["reason"] for r in res.rejects.rows} == {"locked": "unreadable folder", "locked.jpg": "unreadable folder"}
    assert res.accepted == 1 and count_partition_inputs(spec) == res.accepted + len(res.rejects)


def test_object_store_tar_closes_its_file_when_closed_and_when_it_does_not_open(monkeypatch):
    """A tar read from an object store (here fsspec's memory://) closes the object's file with the tar, and
    closes it at once when the bytes are not a tar; the member offsets point into the object."""
    import fsspec

    from pipeline import sources

    fs = fsspec.filesystem("memory")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        _add(tf, "a.jpg", b"abc")
    fs.pipe_file("/lineup-test/good.tar", buf.getvalue())
    fs.pipe_file("/lineup-test/bad.tar", b"not a tar" * 100)
    opened = []

    def recording_open_input(path):  # a BytesIO of the object: memory://'s own file object never closes
        opened.append(io.BytesIO(fs.cat_file(path)))
        return opened[-1]

    monkeypatch.setattr(sources, "open_input", recording_open_input)
    with sources._open_tar("memory://lineup-test/good.tar") as tf:
        member = next(iter(tf))
        assert member.name == "a.jpg" and not opened[-1].closed
        assert sources.read_bytes("memory://lineup-test/good.tar", member.offset_data, member.size) == b"abc"
    assert opened[-1].closed
    with pytest.raises(tarfile.ReadError):
        sources._open_tar("memory://lineup-test/bad.tar")
    assert len(opened) == 2 and opened[-1].closed
    fs.rm("/lineup-test", recursive=True)
