"""Boosters of creators everyone already likes: accounts that engage with nearly every image of one
of the most followed creators (simulate(boost_popular=True)). The rule (sql/social_boosters.sql)
judges the images they engage with against the rest of those images' audience, not the creator's
popularity, so they are caught as well as boosters of an unknown creator, and few people are
flagged by mistake."""

import pyarrow.parquet as pq
import pytest

from pipeline.social import SocialConfig, build_social_pairs
from pipeline.social.evaluate import bot_detection
from pipeline.social.simulate import SimConfig, simulate

CFG = SocialConfig(export_webdataset=False, export_pickapic=False, user_pairs=False)


@pytest.fixture(scope="module", params=[8, 12])
def popular(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"boost{request.param}")
    cfg = SimConfig(n_events=200_000, seed=request.param, boost_popular=True)
    summary = simulate(root / "social", root / "truth", cfg)
    return root, summary, build_social_pairs(root / "social", None, CFG)


def test_boosted_creators_are_popular(popular):
    """The simulated situation is the one meant: the boosted creators are among the most followed."""
    root, _, _ = popular
    t = pq.read_table(root / "truth" / "images_truth.parquet").to_pandas()
    followers = t.groupby("creator_id").creator_followers.first()
    boosted = t[t.pushed_by == "booster"].creator_id.unique()
    assert len(boosted) >= 1
    assert (followers[boosted] >= followers.quantile(0.85)).all()


def test_boosters_of_popular_creators_are_caught(popular):
    root, _, r = popular
    found = bot_detection(r.bots, root / "truth")
    b = found["by_kind"]["booster"]
    assert b["caught"] == b["total"] > 0, b
    assert sum(found["false_flags_by_rule"].values()) <= 0.005 * found["people"], found["false_flags_by_rule"]
    assert found["precision"] >= 0.6
