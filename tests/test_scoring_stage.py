"""Scoring stage with tiny models built from config, saved to tmp_path and loaded by the real code."""

import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import TINY_CLIP, write_tiny_clip

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import itertools

from pipeline.scoring import (
    ClipConfig,
    ClipEncoder,
    HeadConfig,
    QualityConfig,
    ScorerUnavailable,
    ScoringConfig,
    combine_scores,
    face_quality,
    rank_candidates,
    score_candidates,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    cfg = d / "lineup-tiny-clip.json"
    write_tiny_clip(cfg, d / "tiny_clip.pt")
    # LAION improved-aesthetic-predictor layout (layers.0/2/4/6/7), scaled to embed_dim 16
    g = torch.Generator().manual_seed(1)
    dims = [16, 32, 8, 8, 4, 1]
    sd = {}
    for key, (i, o) in zip([0, 2, 4, 6, 7], itertools.pairwise(dims)):
        sd[f"layers.{key}.weight"] = torch.randn(o, i, generator=g) * 0.3
        sd[f"layers.{key}.bias"] = torch.zeros(o)
    torch.save(sd, d / "aesthetic.pth")
    from safetensors.torch import save_file

    save_file(
        {"weight": torch.randn(1, 32, generator=g), "bias": torch.zeros(1)}, str(d / "social.safetensors")
    )
    return d, cfg


def _images(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (
            f"uid{i}",
            rng.integers(0, 256, size=(40 + 3 * i, 48, 3), dtype=np.uint8),
            f"a photo number {i}" if i != 2 else None,
        )
        for i in range(n)
    ]


def _faces():
    rng = np.random.default_rng(3)
    e = rng.normal(size=(4, 8)).astype(np.float32)
    e[1] = e[0] + 0.1 * e[1]
    return pa.table(
        {
            "uid": ["uid0", "uid0", "uid1", "uid3"],
            "face_index": pa.array([0, 1, 0, 0], pa.int32()),
            "identity_id": ["p", "q", "p", None],
            "embedding": [list(map(float, v)) for v in e],
            "face_width": [120.0, 20.0, 90.0, 200.0],
            "face_height": [130.0, 22.0, 95.0, 210.0],
            "blur": [500.0, 500.0, 30.0, 200.0],
            "yaw": [0.0, 10.0, 30.0, 5.0],
            "pitch": [0.0, 0.0, 5.0, 0.0],
            "det_score": [1.2, 0.1, 0.8, 2.0],
        }
    )


def _config(d, cfg, **kw):
    return ScoringConfig(
        clip=ClipConfig(
            model_name="lineup-tiny-clip",
            pretrained=str(d / "tiny_clip.pt"),
            model_config=str(cfg),
            device="cpu",
            batch_size=2,
        ),
        aesthetic=HeadConfig(weights=str(d / "aesthetic.pth")),
        social_reward=HeadConfig(weights=kw.pop("social", str(d / "social.safetensors"))),
        **kw,
    )


def test_score_candidates_with_tiny_models(tiny):
    d, cfg = tiny
    scores, report = score_candidates(_images(), _faces(), _config(d, cfg))
    assert report["unavailable"] == {}
    assert set(report["available"]) == {
        "clip",
        "aesthetic",
        "social_reward",
        "face_quality",
        "identity_similarity",
    }
    rows = scores.to_pylist()
    # 4 face rows + images 2 and 4 (no faces)
    assert [(r["uid"], r["face_index"]) for r in rows] == [
        ("uid0", 0),
        ("uid0", 1),
        ("uid1", 0),
        ("uid3", 0),
        ("uid2", None),
        ("uid4", None),
    ]
    by = {(r["uid"], r["face_index"]): r for r in rows}
    assert by[("uid2", None)]["clip_score"] is None  # no caption: no text-image score
    assert by[("uid2", None)]["aesthetic"] is not None
    assert by[("uid2", None)]["social_reward"] is None  # this head needs text
    assert -1.0 <= by[("uid4", None)]["clip_score"] <= 1.0
    assert (
        by[("uid0", 0)]["clip_score"] == by[("uid0", 1)]["clip_score"]
    )  # image-level scores repeat per face
    assert by[("uid0", 1)]["face_quality"] == 0.0  # 20 px face
    assert by[("uid0", 0)]["face_quality"] > by[("uid1", 0)]["face_quality"] > 0
    assert by[("uid3", 0)]["identity_similarity"] is None  # no identity
    assert by[("uid0", 0)]["identity_similarity"] is not None  # leave-one-out centroid of "p"
    assert "clip" in by[("uid0", 0)]["scorers"] and "face_quality" in by[("uid0", 0)]["scorers"]
    # deterministic, and the CLIP score is the cosine of the real encoder's embeddings
    again, _ = score_candidates(_images(), _faces(), _config(d, cfg))
    assert again.equals(scores)
    enc = ClipEncoder(_config(d, cfg).clip)
    ie = enc.encode_images([_images()[4][1]])
    te = enc.encode_texts([_images()[4][2]])
    assert abs(float((ie * te).sum()) - by[("uid4", None)]["clip_score"]) < 1e-5


def test_unavailable_scorers_are_reported_and_skipped(tiny, tmp_path):
    d, cfg = tiny
    scores, report = score_candidates(_images(3), None, _config(d, cfg, social=str(tmp_path / "missing.pt")))
    assert "weights not found" in report["unavailable"]["social_reward"]
    assert scores["social_reward"].null_count == scores.num_rows
    assert "face_quality" in report["unavailable"]
    # nothing configured at all: every model scorer is unavailable, the face scorers still run
    scores, report = score_candidates(_images(3), _faces(), ScoringConfig())
    assert set(report["unavailable"]) == {"clip", "aesthetic", "social_reward"}
    assert "no weights configured" in report["unavailable"]["clip"]
    assert (
        "clip is unavailable" in report["unavailable"]["aesthetic"]
        or "no weights" in report["unavailable"]["aesthetic"]
    )
    for c in ("clip_score", "aesthetic", "social_reward"):
        assert scores[c].null_count == scores.num_rows
    assert scores["face_quality"].null_count < scores.num_rows
    # a hub name is refused rather than downloaded
    with pytest.raises(ScorerUnavailable, match="hub"):
        ClipEncoder(ClipConfig(model_name="hf-hub:laion/CLIP-ViT-L-14", pretrained=str(d / "tiny_clip.pt")))
    # a head that does not match the embedding size is unavailable, not a crash
    torch.save({"weight": torch.zeros(1, 768), "bias": torch.zeros(1)}, tmp_path / "l14_linear.pth")
    cfg2 = _config(d, cfg)
    cfg2 = ScoringConfig(
        clip=cfg2.clip,
        aesthetic=HeadConfig(weights=str(tmp_path / "l14_linear.pth")),
        social_reward=cfg2.social_reward,
    )
    scores, report = score_candidates(_images(3), None, cfg2)
    assert "768" in report["unavailable"]["aesthetic"] and scores["aesthetic"].null_count == 3


def test_face_quality_components():
    q = face_quality(
        [10, 60, 120, 120, 120],
        [10, 60, 120, 120, 120],
        blur=[500, 500, 500, 5, 500],
        yaw=[0, 0, 0, 0, 70],
        pitch=[0] * 5,
        det_score=[1] * 5,
    )
    assert q[0] == 0 and q[3] == 0 and q[4] == 0  # too small, too blurry, profile
    assert 0 < q[1] < q[2] <= 1 and q[2] == pytest.approx(1.0)
    # missing inputs drop out instead of failing
    q2 = face_quality([120.0], [120.0])
    assert q2[0] == pytest.approx(1.0)
    assert QualityConfig().size_good == 112.0


def test_combine_and_rank():
    t = pa.table(
        {
            "uid": ["a", "b", "c"],
            "face_index": pa.array([0, 0, None], pa.int32()),
            "clip_score": [0.3, 0.1, None],
            "face_quality": [0.5, 1.0, None],
        }
    )
    s = combine_scores(t, {"clip_score": 1.0, "face_quality": 1.0})
    np.testing.assert_allclose(s[:2], [0.4, 0.55])
    assert np.isnan(s[2])
    r = rank_candidates(t, {"clip_score": 1.0, "face_quality": 1.0}, min_score=0.45)
    assert r["uid"].to_pylist() == ["b"]
    with pytest.raises(KeyError):
        combine_scores(t, {"nope": 1.0})


def _write_reward_folder(d, model, size=32):
    """The lineup-reward-v1 layout (training/reward.py save_reward_model), whole model saved."""
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().float().contiguous() for k, v in model.state_dict().items()},
        str(d / "reward_model.safetensors"),
    )
    conf = {
        "format": "lineup-reward-v1",
        "model_name": "lineup-tiny-reward",
        "model_cfg": TINY_CLIP,
        "pretrained": None,
        "weights": "full",
        "image_size": size,
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
    }
    (d / "reward_config.json").write_text(json.dumps(conf))
    return d


def test_social_reward_from_a_reward_model_folder(tiny, tmp_path):
    import open_clip
    import torch.nn.functional as F

    d, cfg = tiny
    torch.manual_seed(5)
    model = open_clip.create_model("lineup-tiny-clip", pretrained=None).eval()
    folder = _write_reward_folder(tmp_path / "reward", model)
    conf = _config(d, cfg, social=str(folder))
    imgs = _images(3)
    scores, report = score_candidates(imgs, None, conf)
    assert "social_reward" in report["available"], report
    got = {r["uid"]: r["social_reward"] for r in scores.to_pylist()}
    assert got["uid2"] is None  # no caption
    # reference: the same preprocessing as training/reward.py, computed here by hand
    x = torch.from_numpy(imgs[0][1]).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(32, 32), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        ie = F.normalize(model.encode_image((x - mean) / std), dim=-1)
        te = F.normalize(model.encode_text(open_clip.get_tokenizer("lineup-tiny-clip")([imgs[0][2]])), dim=-1)
    assert abs(float((ie * te).sum()) - got["uid0"]) < 1e-4
    # the social reward folder works without the stage's CLIP too
    no_clip = ScoringConfig(social_reward=HeadConfig(weights=str(folder)))
    scores2, report2 = score_candidates(imgs, None, no_clip)
    assert "social_reward" in report2["available"] and "clip" in report2["unavailable"]
    assert abs(scores2.to_pylist()[0]["social_reward"] - got["uid0"]) < 1e-5
    # a trainable-only checkpoint whose base weights are gone is unavailable, with the reason
    c = json.loads((folder / "reward_config.json").read_text())
    c.update(weights="trainable", pretrained=str(tmp_path / "gone.safetensors"))
    (folder / "reward_config.json").write_text(json.dumps(c))
    _, report3 = score_candidates(imgs, None, no_clip)
    assert "base weights" in report3["unavailable"]["social_reward"]


def test_image_scores_computed_once_then_reused(tiny):
    """Image-level scores from score_images, passed back as image_scores, give the same table as one
    pass, without loading any image scorer; the fingerprint follows the scorers' configuration."""
    from pipeline.scoring.stage import score_images, scorer_fingerprint

    d, cfg = tiny
    config = _config(d, cfg)
    whole, _ = score_candidates(_images(), _faces(), config)
    first, _ = score_images(_images()[:3], config)
    second, _ = score_images(_images()[3:], config)
    cached = pa.concat_tables([first, second])
    again, report = score_candidates([], _faces(), config, image_scores=cached)
    rows = lambda t: {(r["uid"], r["face_index"]): r for r in t.to_pylist()}
    a, b = rows(again), rows(whole)
    assert a.keys() == b.keys()
    for k in a:  # the same numbers, up to the float noise of other CLIP batch compositions
        assert a[k]["scorers"] == b[k]["scorers"]
        for c in ("clip_score", "aesthetic", "social_reward", "face_quality", "identity_similarity"):
            assert (a[k][c] is None) == (b[k][c] is None) and (a[k][c] is None or abs(a[k][c] - b[k][c]) < 1e-4), (k, c)
    assert "clip_load" not in report["timings_s"] and {"clip", "aesthetic", "face_quality"} <= set(report["available"])
    other = _config(d, cfg, social=None)
    assert scorer_fingerprint(other) != scorer_fingerprint(config) == first.column("scorer_fingerprint")[0].as_py()
