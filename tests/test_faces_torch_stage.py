"""The batched PyTorch face stage (pipeline/faces/torch_stage.py) on CPU, on small shared photos."""

import io

import numpy as np
import pytest

pytest.importorskip("facenet_pytorch")
torch = pytest.importorskip("torch")
from PIL import Image

from pipeline.faces.dlib_parity import collect_faces, cosine, load_rgb
from pipeline.faces.torch_stage import (
    MTCNN_CHIP_TEMPLATE,
    BatchedMTCNN,
    TorchFaceStage,
    chip_details_from_points,
    decode_batch,
    dlib_face_backend,
)

SMALL = [
    "identities/bbt_sheldon/sheldon3.png",
    "identities/john_simm/000304_00470122.jpg",
    "identities/angelina_jolie/img1.jpg",
]


@pytest.fixture(scope="module")
def stage():
    return TorchFaceStage(device="cpu", decode_workers=2)


def _iou(a, b):
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    i = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return i / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - i)


def test_batched_mtcnn_matches_facenet_pytorch(shared_faces):
    from facenet_pytorch import MTCNN

    ref = MTCNN(keep_all=True, device="cpu", post_process=False, select_largest=False)
    ours = BatchedMTCNN("cpu")
    images = [load_rgb(shared_faces / f) for f in SMALL[:2]]
    # both in one zero-padded canvas (different sizes): each must find what facenet-pytorch finds alone
    H = max(im.shape[0] for im in images)
    W = max(im.shape[1] for im in images)
    canvas = torch.zeros((2, 3, H, W))
    for i, im in enumerate(images):
        canvas[i, :, : im.shape[0], : im.shape[1]] = torch.from_numpy(im.copy()).permute(2, 0, 1).float()
    got = ours.detect(canvas)
    for im, (boxes, probs, pts) in zip(images, got):
        rb, rp, rpts = ref.detect(im, landmarks=True)
        keep = rp >= 0.9
        assert (probs >= 0.9).sum() == keep.sum() == 1
        j = int(np.argmax(probs))
        assert _iou(boxes[j], rb[keep][0]) > 0.85
        # crops by roi_align instead of area resize: landmarks within a few pixels
        assert np.abs(pts[j] - rpts[keep][0]).max() < 4.0


def test_chip_from_mtcnn_points_of_the_template_is_the_identity_chip():
    d = chip_details_from_points(MTCNN_CHIP_TEMPLATE)
    # dlib's convention (get_face_chip_details): the rectangle is centred on the template's
    # point (size/2, size/2) = (75, 75) with width size * scale - 1 = 149, so [0.5, 149.5]
    np.testing.assert_allclose(d.rect, [0.5, 0.5, 149.5, 149.5], atol=1e-9)
    assert abs(d.angle) < 1e-12
    d2 = chip_details_from_points(MTCNN_CHIP_TEMPLATE * 2 + 10)  # the same face, 2x larger, moved
    np.testing.assert_allclose(d2.rect, [10.5, 10.5, 309.5, 309.5], atol=1e-9)  # centre 160, width 299


def test_stage_from_bytes(stage, shared_faces):
    blobs = [(shared_faces / f).read_bytes() for f in SMALL]
    buf = io.BytesIO()
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(buf, format="PNG")
    blobs += [blobs[2][:500], b"", buf.getvalue()]  # truncated JPEG, empty, a faceless PNG
    out = stage.analyze_encoded(blobs)
    assert [len(r) for r in out[:3]] == [1, 1, 1]
    assert out[3][0] == "truncated image" and out[4][0] == "empty file"
    assert out[5] == []
    ref = collect_faces(shared_faces, [shared_faces / f for f in SMALL])
    for faces, im in zip(out[:3], ref):
        f = faces[0]
        assert f.embedding.shape == (128,) and np.linalg.norm(f.embedding) == pytest.approx(1.0, abs=1e-5)
        assert f.blur > 0 and np.isfinite([f.yaw, f.pitch, f.roll]).all()
        # dlib's shape predictor on MTCNN's box instead of HOG's: close to dlib, not equal
        # (180 shared faces: median 0.9992, min 0.90; bench/bench_dlib_torch.py stage-parity)
        assert cosine(im.faces[0].reference, f.embedding) > 0.98
    # decoded arrays give the same faces as bytes
    again = stage.analyze([load_rgb(shared_faces / f) for f in SMALL])
    for a, b in zip(again, out[:3]):
        np.testing.assert_allclose(a[0].embedding, b[0].embedding, atol=1e-5)
        np.testing.assert_allclose(a[0].bbox, b[0].bbox, atol=1e-3)


def test_decode_batch_on_cpu(shared_faces):
    blob = (shared_faces / SMALL[2]).read_bytes()
    d = decode_batch([blob, b"not an image"], torch.device("cpu"))
    assert d[0].image.shape == (3, *load_rgb(shared_faces / SMALL[2]).shape[:2])
    assert d[1].image is None and d[1].error[0] == "not an image"
    assert decode_batch([blob], torch.device("cpu"), max_pixels=100)[0].error[0] == "decompression bomb"


def test_mtcnn_points_alignment(shared_faces):
    st = TorchFaceStage(device="cpu", landmarks="mtcnn")
    assert "align-mtcnn5" in st.model_version
    ref = collect_faces(shared_faces, [shared_faces / SMALL[0]])[0].faces[0].reference
    (face,) = st.analyze([load_rgb(shared_faces / SMALL[0])])[0]
    assert cosine(ref, face.embedding) > 0.9  # shared photos: median 0.993, min 0.87
    with pytest.raises(ValueError, match="landmarks"):
        TorchFaceStage(device="cpu", landmarks="sp68")


def test_backend_choice_on_cpu():
    b = dlib_face_backend(device="cpu")
    assert type(b).__name__ == "DlibBackend" and b.detector == "hog" and b.descriptor == "torch"
    assert dlib_face_backend(device="cpu", detector="mtcnn").detector == "mtcnn"


# -- the face stage's one path (pipeline/faces/stage.py analyze_chunks) through the torch stage on CPU --

PARTITION = SMALL + ["groups/dlib__2008_001009.jpg", "identities/bbt_amy/amy1.png"]


def _row(path, data=None, uid=None):
    from pipeline.ids import content_uid

    data = path.read_bytes() if data is None else data
    return {"uid": uid or content_uid(data), "source": path.name, "path": str(path), "offset": 0, "length": len(data)}


def test_partition_through_the_torch_path_equals_the_per_image_path(stage, shared_faces, tmp_path):
    """run_face_partition (what the faces asset runs) on the torch stage: rows read on its threads,
    decoded by it and analysed in chunks with the next chunk decoded ahead, gives per image the faces of
    the per-image path (one decoded array at a time), and the rejects of the serial decoder."""
    import pyarrow as pa

    from pipeline.faces.stage import analyze_chunks, decode_rows, decodes_ahead, run_face_partition
    from pipeline.ingest import load_image

    assert decodes_ahead(stage)
    good = [_row(shared_faces / f) for f in PARTITION]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((shared_faces / SMALL[2]).read_bytes()[:2000])
    changed = tmp_path / "changed.jpg"
    changed.write_bytes((shared_faces / SMALL[1]).read_bytes())
    changed_row = _row(changed)
    changed.write_bytes((shared_faces / SMALL[2]).read_bytes()[: changed_row["length"]])  # edited in place
    missing = _row(shared_faces / SMALL[0], uid="a" * 8)
    missing["path"] = str(tmp_path / "gone.jpg")
    bad = [_row(truncated), changed_row, missing]
    rows = good[:2] + bad[:1] + good[2:4] + bad[1:] + good[4:]
    res = run_face_partition(pa.Table.from_pylist(rows), stage, "p", batch_size=3)

    assert res.reconciles() and res.scan.num_rows == len(good)
    # the rejects, reasons and details are the serial decoder's (decode_rows without a backend)
    serial = decode_rows((rows, None))[1]
    assert [(r["source"], r["reason"], r["detail"], r["uid"]) for r in res.rejects.rows] == serial
    assert [r[1] for r in serial] == ["truncated image", "photo changed since ingestion", "unreadable file"]

    faces = res.faces.to_pylist()
    by_uid = {}
    for f in faces:
        by_uid.setdefault(f["uid"], []).append(f)
    assert sum(res.scan.column("n_faces").to_pylist()) == len(faces) >= len(good)
    assert max(len(v) for v in by_uid.values()) >= 2  # a group photo: several faces in one image
    for row in good:
        ref = stage.analyze([load_image(row).rgb])[0]
        got = by_uid.get(row["uid"], [])
        assert len(got) == len(ref), row["source"]
        ref = sorted(ref, key=lambda f: (float(f.bbox[0]), float(f.bbox[1])))
        for g, r in zip(got, ref):
            # the chunk's images share a letterboxed canvas: boxes move by a fraction of a pixel
            np.testing.assert_allclose([g["x1"], g["y1"], g["x2"], g["y2"]], r.bbox, atol=2.0)
            assert cosine(np.asarray(g["embedding"])[None], r.embedding[None])[0] > 0.99
            assert g["blur"] == pytest.approx(r.blur, rel=0.05) and g["yaw"] == pytest.approx(r.yaw, abs=2.0)
            assert (g["image_height"], g["image_width"]) == load_image(row).rgb.shape[:2]

    # the Ray actors' entry point over the same chunks: the same records, in order
    chunks = [(rows[i : i + 3], None) for i in range(0, len(rows), 3)]
    streamed = [(uid, len(found)) for recs, _, _ in analyze_chunks(stage, chunks) for uid, _, _, _, found in recs]
    assert streamed == list(zip(res.scan.column("uid").to_pylist(), res.scan.column("n_faces").to_pylist()))


def test_blur_of_every_face_in_one_pass_equals_face_by_face(shared_faces):
    """The faces' blur is sampled image by image, all faces of an image in one grid and copied back once;
    each value must be the one its face gets alone (no face mixed up with another)."""
    from pipeline.faces.torch_stage import _blur_batch

    st = BatchedMTCNN("cpu")
    images = [torch.from_numpy(load_rgb(shared_faces / f).copy()).permute(2, 0, 1)
              for f in ("groups/dlib__2008_001009.jpg", SMALL[1])]
    points = [[q.astype(np.float64) for q in st.detect(im[None].float())[0][2]] for im in images]
    assert len(points[0]) >= 2 and len(points[1]) >= 1
    together = _blur_batch(images, points)
    alone = [_blur_batch([im], [[q]])[0] for im, pts in zip(images, points) for q in pts]
    np.testing.assert_allclose(together, alone, rtol=1e-5)
    assert len(set(np.round(together, 3))) == len(together)  # distinct faces, distinct values


def test_no_read_back_or_copy_per_image_or_face(stage, shared_faces):
    """The stage's batch after detection (landmarks, chips, descriptors, blur) reads nothing back and copies
    nothing to the device per image or face: the ops that do (a scalar read, a tensor made from host data, a
    data-dependent shape) are counted by torch's profiler and are as many for 2 images as for 6."""
    from torch.profiler import ProfilerActivity, profile

    # one size, so that detection runs the same scales and buckets whatever the batch
    images = [torch.from_numpy(load_rgb(shared_faces / f).copy()).permute(2, 0, 1) for f in SMALL]
    images = [torch.nn.functional.interpolate(im[None].float(), size=(224, 224)).to(torch.uint8)[0] for im in images]
    watched = ("aten::item", "aten::_local_scalar_dense", "aten::lift_fresh", "aten::nonzero", "aten::index_put_")
    counts, faces = {}, {}
    for n in (2, 6):
        batch = (images * 2)[:n]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            found = stage.analyze_tensors(batch)
        events = {e.key: e.count for e in prof.key_averages()}
        counts[n] = {k: events.get(k, 0) for k in watched}
        faces[n] = sum(map(len, found))
    assert faces[6] >= 3 * faces[2] / 2 > 0  # more faces in the larger batch ...
    assert counts[6] == counts[2], counts  # ... and not one more read-back or copy
