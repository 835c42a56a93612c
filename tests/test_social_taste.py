"""The taste-balanced test (pipeline/social/taste.py): a polarising image, loved by users of one
taste and ignored by the rest, does not win over an image everyone likes moderately, although its
pooled engagement is higher. The tastes are learned from the log (the other images users were
shown), never given."""

import numpy as np
import pyarrow.compute as pc

from pipeline.social import SocialConfig, build_social_pairs
from pipeline.social.simulate import write_social_input
from pipeline.social.taste import balanced_log_rate, taste_cells

CFG = {"export_webdataset": False, "export_pickapic": False, "user_pairs": False, "min_exposure": 10}


def _polarised_log(tmp_path):
    """400 users in two tastes (never written down). P: clicked by 50% of taste 1, 2% of taste 2
    (pooled 26%); Q: clicked by 12% of both. Six other images show the tastes: T1-T3 clicked by 60%
    of taste 1 and 5% of taste 2, T4-T6 the reverse."""
    rate = {"P": (0.50, 0.02), "Q": (0.12, 0.12)}
    for k in range(1, 4):
        rate[f"T{k}"] = (0.60, 0.05)
        rate[f"T{k + 3}"] = (0.05, 0.60)
    images = [
        {"image_id": i, "prompt": "red fox" if i in "PQ" else "blue owl", "creator_id": f"c{i}"} for i in rate
    ]
    rng = np.random.default_rng(0)
    ev = []
    for taste in (0, 1):
        for j in range(200):
            u = f"u{taste}{j:03d}"
            for n, (i, r) in enumerate(rate.items()):
                ts = f"2026-11-02 {j % 24:02d}:{n:02d}:{taste * 10:02d}"
                ev.append({"ts": ts, "user_id": u, "image_id": i, "event": "impression"})
                if rng.random() < r[taste]:
                    ev.append({"ts": ts, "user_id": u, "image_id": i, "event": "click"})
    return write_social_input(tmp_path, images, ev)


def _pairs(r):
    pop = r.pairs.filter(pc.field("kind") == "population").to_pylist()
    return {(p["winner_image_id"], p["loser_image_id"]) for p in pop}


def test_polarising_image_does_not_win_on_its_fans_alone(tmp_path):
    d = _polarised_log(tmp_path)
    pooled = build_social_pairs(d, None, SocialConfig(taste_axes=0, **CFG))
    assert ("P", "Q") in _pairs(pooled)  # the pooled test is sure P is better
    balanced = build_social_pairs(d, None, SocialConfig(**CFG))
    assert ("P", "Q") not in _pairs(balanced)
    assert balanced.stats["test"].startswith("taste-balanced")


def test_taste_cells_separate_the_two_tastes(tmp_path):
    # users 0-99 engage with images 0-4, users 100-199 with images 5-9; every user sees all ten
    rng = np.random.default_rng(1)
    user = np.repeat(np.arange(200), 10)
    image = np.tile(np.arange(10), 200)
    fan = (user < 100) == (image < 5)
    score = (rng.random(user.size) < np.where(fan, 0.6, 0.05)).astype(float)
    cells, s = taste_cells(user, image, score, 10, axes=1)
    assert set(np.unique(cells)) == {0, 1} and s.size == 1
    first, second = np.bincount(cells[:100], minlength=2), np.bincount(cells[100:], minlength=2)
    assert first.max() >= 95 and second.max() >= 95 and first.argmax() != second.argmax()
    few, _ = taste_cells(user, image, score, 10, axes=1, min_images=11)
    assert (few == -1).all()  # nobody was shown enough images to place


def test_balanced_log_rate_cancels_love_and_indifference():
    # one image loved by cell 0 and ignored by cell 1, one liked equally by both: same pooled
    # engagement would favour neither; on the log scale the even one is ahead
    k = np.array([[38.0, 20.0], [2.0, 20.0]])
    e = np.array([[100.0, 100.0], [100.0, 100.0]])
    m, v = balanced_log_rate(1.0, 1.0, k, e)
    assert m[1] > m[0] and (v > 0).all()
