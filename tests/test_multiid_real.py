"""Multi-identity builder on real photos: copy-paste guard, shard determinism, loading with webdataset/datasets.

Copies and composites are made here in tmp_path from ../shared/data/faces (never copied into the repo).
"""

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.faces import get_backend
from pipeline.faces.folders import faces_tables, label_groups_by_nearest, load_rgb_bytes
from pipeline.multiid import MultiIDConfig, build_multiid_dataset, evaluate_folder, hf_features

A = ["angelina_jolie/img1.jpg", "angelina_jolie/img2.jpg", "angelina_jolie/img4.jpg"]
J = ["jennifer_aniston/img3.jpg", "jennifer_aniston/img54.jpg", "jennifer_aniston/img56.jpg"]


def _save(arr, path, quality=None):
    im = Image.fromarray(arr)
    if quality is None:
        im.save(path)
    else:
        im.save(path, "JPEG", quality=quality)
    return path


def _fit_height(rgb, h):
    w = round(rgb.shape[1] * h / rgb.shape[0])
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.BICUBIC))


@pytest.fixture(scope="module")
def world(shared_faces, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiid")
    src = {rel: shared_faces / "identities" / rel for rel in A + J}
    rgb = {rel: load_rgb_bytes(p.read_bytes()) for rel, p in src.items()}
    a0, j0 = rgb[A[0]], rgb[J[0]]
    files = [(src[r], r.split("/")[0]) for r in A + J]
    family = {}  # generated file -> source photos it was made from
    h, w = a0.shape[:2]
    p = _save(np.asarray(Image.fromarray(a0).resize((w * 3 // 5, h * 3 // 5), Image.BICUBIC)), tmp / "a0_resized.png")
    files.append((p, "angelina_jolie")); family[str(p)] = {A[0]}
    p = _save(a0, tmp / "a0_q40.jpg", quality=40)
    files.append((p, "angelina_jolie")); family[str(p)] = {A[0]}
    # composite of two single-person photos, side by side on a grey canvas
    left, right = _fit_height(a0, 700), _fit_height(j0, 700)
    canvas = np.full((780, left.shape[1] + right.shape[1] + 120, 3), 120, np.uint8)
    canvas[40:740, 40:40 + left.shape[1]] = left
    canvas[40:740, 80 + left.shape[1]:80 + left.shape[1] + right.shape[1]] = right
    p = _save(canvas, tmp / "composite_a0_j0.jpg", quality=92)
    files.append((p, None)); family[str(p)] = {A[0], J[0]}
    be = get_backend("dlib")
    images, faces, ids = faces_tables(files, be, source="test")
    comp_uid = [r["uid"] for r in images.to_pylist() if r["path"].endswith("composite_a0_j0.jpg")]
    ids = label_groups_by_nearest(faces, ids, set(comp_uid), min_sim=0.9)
    path_of = {r["uid"]: r["path"] for r in images.to_pylist()}
    fam = {}
    for uid, path in path_of.items():
        rel = next((r for r in src if str(src[r]) == path), None)
        fam[uid] = family.get(path, {rel} if rel else set())
    return {"images": images, "faces": faces, "ids": ids, "fam": fam, "path_of": path_of, "comp_uid": comp_uid[0], "backend": be, "tmp": tmp}


CFG = MultiIDConfig(min_face_px=80, refs_per_person=2, eval_fraction=0.0, shard_max_count=3)


def _same_source(world, a, b):
    return bool(world["fam"][a] & world["fam"][b])


def test_copy_paste_guard(world, tmp_path):
    assert world["ids"].num_rows == world["images"].num_rows + 1, "composite should get both identities"
    # with the similarity ceiling disabled, the hash guard alone must reject every copy
    for cfg in (CFG, MultiIDConfig(**{**CFG.to_dict(), "sim_high": 1.0})):
        res = build_multiid_dataset(world["images"], world["faces"], world["ids"], None, cfg)
        cands = res.candidates.to_pylist()
        copies = [c for c in cands if _same_source(world, c["target_uid"], c["ref_uid"])]
        assert len(copies) >= 8  # resized, re-encoded and composite relations, both directions
        for c in copies:
            assert c["status"] != "selected", c
            if c["status"] != "ref_quality":
                assert c["status"].startswith("near_duplicate_") or c["status"] == "sim_above_high", c
        if cfg.sim_high == 1.0:
            assert all(c["status"].startswith("near_duplicate_") for c in copies if c["status"] != "ref_quality")
        # the composite is a two-person target and got genuine references for both people
        comp = [s for s in res.samples if s["target"]["uid"] == world["comp_uid"]]
        assert comp and comp[0]["num_persons"] == 2
        for s in res.samples:
            for f in s["faces"]:
                for r in f["refs"]:
                    assert not _same_source(world, s["target"]["uid"], r["uid"])
                    assert r["identity_id"] == f["identity_id"]
        assert res.pairs.num_rows > 0
        assert res.stats["candidates_removed_by"]["candidates_total"] == len(cands)
        assert sum(v for k, v in res.stats["candidates_removed_by"].items() if k != "candidates_total") == len(cands)
    sheet = res.contact_sheet(n=2)
    assert Image.open(io.BytesIO(sheet)).format == "PNG"


def test_shards_deterministic_and_loadable(world, tmp_path):
    import datasets
    import webdataset as wds

    r1 = build_multiid_dataset(world["images"], world["faces"], world["ids"], tmp_path / "a", CFG)
    r2 = build_multiid_dataset(world["images"], world["faces"], world["ids"], tmp_path / "b", CFG)
    names = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for n in names:
        if n.suffix in (".tar", ".json"):
            assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    tars = sorted(str(p) for p in (tmp_path / "a" / "train").glob("*.tar"))
    assert len(tars) >= 2 and r1.shards["train"] == r2.shards["train"]
    manifest = json.loads((tmp_path / "a" / "train" / "manifest.json").read_text())
    assert manifest["num_samples"] == len(r1.samples) and manifest["config"]["sim_low"] == pytest.approx(0.91)

    got = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert len(got) == len(r1.samples)
    for s in got:
        meta = s["json"]
        assert meta["key"] == s["__key__"] and "." not in s["__key__"]
        assert meta["target"]["member"] in s
        for f in meta["faces"]:
            for r in f["refs"]:
                assert isinstance(s[r["member"]], Image.Image) and r["kind"] == "face_crop"
                assert len(r["embedding"]) == 128 and "similarity" in r and "face_hamming" in r

    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train", features=hf_features(CFG, r1.samples),
                               cache_dir=str(tmp_path / "hf"))
    assert len(ds) == len(r1.samples)
    row = ds[0]
    meta = row["json"]
    assert meta["key"] == row["__key__"] and meta["faces"][0]["refs"][0]["member"] == "ref_0.jpg"
    assert row[meta["target"]["member"]] is not None and row["ref_0.jpg"] is not None


def test_evaluate_folder_extremes(world, tmp_path):
    res = build_multiid_dataset(world["images"], world["faces"], world["ids"], tmp_path / "ds", CFG)
    single = next(s for s in res.samples if s["num_persons"] == 1)
    gen = tmp_path / "gen"
    gen.mkdir()
    # "generated" image = the ground truth itself -> Sim(GT) 1, M_CP -1
    (gen / f"{single['key']}.png").write_bytes(_png(load_rgb_bytes(res.read_bytes(single["target"]["uid"]))))
    out = evaluate_folder(gen, tmp_path / "ds", world["backend"])
    assert out["n_images"] == 1 and out["unknown_keys"] == []
    assert out["summary"]["sim_gt"] == pytest.approx(1.0, abs=2e-3)
    assert out["summary"]["m_cp"] == pytest.approx(-1.0, abs=0.05)


def _png(rgb):
    b = io.BytesIO()
    Image.fromarray(rgb).save(b, "PNG")
    return b.getvalue()
