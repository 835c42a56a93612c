import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.faces import DetectedFace, FaceBackend, get_backend
from pipeline.faces.stage import FACES_SCHEMA, detect_faces, faces_schema


class FakeBackend(FaceBackend):
    """Faces at fixed places, returned right-to-left to check that the stage reorders them."""

    name = "fake"
    model_version = "fake-1"
    embedding_dim = 4

    def analyze(self, images):
        out = []
        for im in images:
            n = int(im[0, 0, 0])  # the number of faces is written in the first pixel
            faces = []
            for k in reversed(range(n)):
                x = 10.0 + 30 * k
                e = np.zeros(4, np.float32)
                e[k % 4] = 1
                faces.append(
                    DetectedFace(
                        bbox=[x, 5, x + 20, 30],
                        landmarks=np.full((5, 2), x),
                        det_score=0.5 + k / 10,
                        embedding=e,
                    )
                )
            out.append(faces)
        return out


def _img(n_faces, w=120, h=40):
    a = np.zeros((h, w, 3), np.uint8)
    a[0, 0, 0] = n_faces
    return a


def test_rows_ordering_and_schema():
    items = [("b", "shard/b.jpg", _img(3)), ("a", "shard/a.jpg", _img(2)), ("c", "shard/c.jpg", _img(0))]
    seen = []
    table, without, timings = detect_faces(
        items, FakeBackend(), batch_size=2, progress=lambda i, f: seen.append((i, f))
    )
    assert table.schema == faces_schema(4)
    assert without == ["c"]
    assert seen == [(2, 5), (3, 5)]
    assert timings["images"] == 3 and timings["faces"] == 5 and timings["images_per_s"] > 0
    rows = table.to_pylist()
    assert [(r["uid"], r["face_index"]) for r in rows] == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("b", 2)]
    assert [r["x1"] for r in rows] == [10.0, 40.0, 10.0, 40.0, 70.0]  # left to right
    assert (
        rows[0]["source"] == "shard/a.jpg" and rows[0]["image_width"] == 120 and rows[0]["image_height"] == 40
    )
    assert rows[0]["backend"] == "fake" and rows[0]["model_version"] == "fake-1"
    assert rows[2]["face_width"] == 20 and rows[2]["face_height"] == 25
    assert len(rows[0]["landmarks"]) == 10 and rows[4]["embedding"] == [0, 0, 1, 0]


def test_empty_input():
    table, without, timings = detect_faces([], FakeBackend())
    assert table.num_rows == 0 and without == [] and timings["images"] == 0
    assert table.schema == faces_schema(4)


def test_dlib_rows_on_real_photos(shared_faces):
    backend = get_backend("dlib")
    paths = [
        shared_faces / "identities" / "george_clooney",
        shared_faces / "groups" / "face-api.js__bbt1.jpg",
    ]
    files = sorted(p for p in paths[0].iterdir() if p.suffix == ".jpg")[:1] + [paths[1]]
    items = [
        (f.stem, str(f.relative_to(shared_faces)), np.asarray(Image.open(f).convert("RGB"))) for f in files
    ]
    table, without, timings = detect_faces(items, backend)
    assert table.schema.equals(FACES_SCHEMA)
    assert without == []
    per_uid = {}
    for r in table.to_pylist():
        per_uid.setdefault(r["uid"], []).append(r)
    assert len(per_uid[files[0].stem]) == 1 and len(per_uid["face-api.js__bbt1"]) >= 3
    xs = [r["x1"] for r in per_uid["face-api.js__bbt1"]]
    assert xs == sorted(xs)
    emb = np.asarray(table.column("embedding").combine_chunks().flatten().to_numpy()).reshape(
        table.num_rows, 128
    )
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert timings["embed_s"] > 0 and timings["detect_s"] > 0
    assert pa.types.is_fixed_size_list(table.schema.field("landmarks").type)


def test_embedding_dim_mismatch_is_an_error():
    class Liar(FakeBackend):
        embedding_dim = 8

    with pytest.raises(ValueError, match="expected 8"):
        detect_faces([("a", "a", _img(1))], Liar())


def test_gpu_backend_of_arrays_decodes_on_threads_like_the_serial_decoder(shared_faces, tmp_path):
    """A GPU backend that takes RGB arrays (insightface on CUDA): its chunks are large, decoded on threads
    ahead, and give the serial decoder's arrays and rejects, in row order."""
    from pipeline.faces.stage import chunk_images, decode_rows, decodes_ahead
    from pipeline.ids import content_uid

    class OnGpu(FakeBackend):
        device = "cuda:0"

    files = sorted((shared_faces / "groups").glob("*.jpg"))[:5]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(files[0].read_bytes()[:1000])
    rows = [{"uid": content_uid(p.read_bytes()), "source": p.name, "path": str(p), "offset": 0,
             "length": p.stat().st_size} for p in [*files[:2], broken, *files[2:]]]
    backend = OnGpu()
    assert decodes_ahead(backend) and chunk_images(backend, 8) == 256 and chunk_images(FakeBackend(), 8) == 8
    threaded, rejects, _ = decode_rows((rows, None), backend)
    serial, serial_rejects, _ = decode_rows((rows, None))
    assert [r["uid"] for r, _ in threaded] == [r["uid"] for r, _ in serial] and len(threaded) == 5
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(threaded, serial))
    assert rejects == serial_rejects and rejects[0][1] == "truncated image"
