import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.ids import content_uid
from pipeline.ingest import ingest_partition
from pipeline.sources import iter_partition, load_registry, register_new_inputs


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
    assert reasons["member not ingested"] == 1  # the pickle is never decoded
    assert reasons["sample has no image"] == 2  # 000002 (only a pickle) and 000003 (only json)
    assert res.reconciles()


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
        write_parquet_atomic(faces_schema(128).empty_table(), layout.partition_file("faces", spec.key))
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
        write_parquet_atomic(pa.Table.from_pylist([row], schema=faces_schema(dim)), layout.partition_file("faces", spec.key))
    with pytest.raises(MixedFaceModels, match="one collection, one face model") as e:
        load_collection(layout)
    assert keys[0] in str(e.value) and keys[1] in str(e.value) and "512-d" in str(e.value)
