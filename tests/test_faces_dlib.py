"""The dlib backend on the shared real photos (../shared/data/faces)."""

import numpy as np
import pytest
from PIL import Image

from pipeline.faces import get_backend

PEOPLE = {
    "angelina_jolie": ["img1.jpg", "img2.jpg", "img4.jpg"],
    "george_clooney": None,
    "bbt_sheldon": None,
    "jennifer_aniston": None,
}


def _load(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def photos(shared_faces):
    out = []
    for person, names in PEOPLE.items():
        folder = shared_faces / "identities" / person
        files = (
            [folder / n for n in names]
            if names
            else sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png"))[:3]
        )
        out += [(person, f.name, _load(f)) for f in files]
    return out


@pytest.fixture(scope="module")
def hog():
    return get_backend("dlib")


@pytest.fixture(scope="module")
def hog_results(hog, photos):
    return hog.analyze([p[2] for p in photos])


def _check_face(face, image):
    h, w = image.shape[:2]
    x1, y1, x2, y2 = face.bbox
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    assert (
        face.bbox.dtype == np.float32
        and face.landmarks.shape == (5, 2)
        and face.landmarks.dtype == np.float32
    )
    assert face.embedding.shape == (128,) and face.embedding.dtype == np.float32
    assert np.isfinite(face.embedding).all()
    assert np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)
    le, re, nose, lm, rm = face.landmarks
    assert le[0] < re[0] and lm[0] < rm[0]  # image-left first
    assert max(le[1], re[1]) < nose[1] < min(lm[1], rm[1])  # eyes above nose above mouth (upright faces)
    assert x1 - 5 <= nose[0] <= x2 + 5 and y1 - 5 <= nose[1] <= y2 + 5
    assert face.face_width > 20 and face.blur > 0 and np.isfinite([face.yaw, face.pitch, face.roll]).all()


def test_identity_photos_one_face_each(hog, photos, hog_results):
    assert hog.name == "dlib" and hog.embedding_dim == 128 and "hog" in hog.model_version
    for (person, name, image), faces in zip(photos, hog_results):
        assert len(faces) == 1, f"{person}/{name}: {len(faces)} faces"
        _check_face(faces[0], image)
        assert abs(faces[0].roll) < 30 and abs(faces[0].yaw) < 60


def test_same_person_more_similar_than_different(photos, hog_results):
    people = np.array([p[0] for p in photos])
    E = np.stack([faces[0].embedding for faces in hog_results])
    S = E @ E.T
    iu = np.triu_indices(len(people), 1)
    same = people[iu[0]] == people[iu[1]]
    assert S[iu][same].min() > S[iu][~same].max(), (S[iu][same].min(), S[iu][~same].max())
    assert np.median(S[iu][same]) > 0.9 > np.median(S[iu][~same])


def test_group_photo_several_faces(hog, shared_faces):
    image = _load(shared_faces / "groups" / "face-api.js__bbt1.jpg")
    faces = hog.analyze([image])[0]
    assert len(faces) >= 3
    for f in faces:
        _check_face(f, image)


def test_big_image_is_searched_downscaled(hog, shared_faces):
    image = _load(shared_faces / "identities" / "angelina_jolie" / "img1.jpg")
    big = np.asarray(
        Image.fromarray(image).resize((image.shape[1] * 3, image.shape[0] * 3), Image.Resampling.BILINEAR)
    )
    small_face = hog.analyze([image])[0][0]
    big_face = hog.analyze([big])[0][0]
    _check_face(big_face, big)
    np.testing.assert_allclose(big_face.bbox / 3, small_face.bbox, atol=0.08 * small_face.face_width)
    assert float(big_face.embedding @ small_face.embedding) > 0.95


def test_no_face_and_bad_input(hog):
    assert hog.analyze([np.zeros((200, 300, 3), np.uint8), np.full((10, 10, 3), 128, np.uint8)]) == [[], []]
    assert hog.analyze([]) == []
    with pytest.raises(ValueError, match="RGB uint8"):
        hog.analyze([np.zeros((20, 20), np.uint8)])


def test_mtcnn_detector(photos, hog_results):
    pytest.importorskip("facenet_pytorch")
    mt = get_backend("dlib", detector="mtcnn")
    assert "mtcnn" in mt.model_version
    picks = [i for i, p in enumerate(photos) if p[0] == "bbt_sheldon"][:2]  # 150 px crops: fast on CPU
    sample = [photos[i] for i in picks]
    faces = mt.analyze([p[2] for p in sample])
    for (person, name, image), found, ref in zip(sample, faces, [hog_results[i] for i in picks]):
        assert len(found) == 1, f"{person}/{name}"
        _check_face(found[0], image)
        assert 0.9 <= found[0].det_score <= 1.0
        # same face, same descriptor model: nearly the same embedding as with HOG boxes
        assert float(found[0].embedding @ ref[0].embedding) > 0.9


def test_unknown_detector():
    with pytest.raises(ValueError, match="detector"):
        get_backend("dlib", detector="cnn")
