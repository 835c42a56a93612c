"""The decision rules on a hand-made log: clear winner, tie, low exposure, self-engagement, bots,
per-user pairs, prompt normalisation; Parquet and CSV inputs give the same pairs."""

import numpy as np
import pyarrow.compute as pc
import pytest

from pipeline.social import SocialConfig, build_social_pairs, draw_user_sets, normalize_prompt
from pipeline.social.build import fdr_select
from pipeline.social.simulate import write_social_input

CFG = SocialConfig(min_exposure=50, min_prob=0.99, export_webdataset=False, export_pickapic=False)


def _log():
    images = [
        {
            "image_id": "A",
            "prompt": "A red fox, at dawn!",
            "creator_id": "cA",
            "created_at": "2026-11-01 00:00:00",
        },
        {
            "image_id": "B",
            "prompt": "a red  fox at dawn",
            "creator_id": "cB",
            "created_at": "2026-11-01 00:00:00",
        },
        {"image_id": "C", "prompt": "blue owl", "prompt_id": "owl", "creator_id": "cC"},
        {"image_id": "D", "prompt": "Blue owl.", "prompt_id": "owl", "creator_id": "cD"},
        {"image_id": "E", "prompt": "green cat", "creator_id": "cE"},
        {"image_id": "F", "prompt": "green cat", "creator_id": "cF"},
        {"image_id": "G", "prompt": "tiny robot", "creator_id": "creatorG"},
        {"image_id": "H", "prompt": "tiny robot", "creator_id": "cH"},
    ]
    ev = []

    def add(img, users, event, day="2026-11-02"):
        for j, u in enumerate(users):
            ev.append(
                {
                    "ts": f"{day} 10:{j // 60 % 60:02d}:{j % 60:02d}",
                    "user_id": u,
                    "image_id": img,
                    "event": event,
                }
            )

    add("A", [f"a{i}" for i in range(200)], "impression")
    add("A", [f"a{i}" for i in range(80)], "like")
    add("A", [f"a{i}" for i in range(40)], "save")
    add("B", [f"b{i}" for i in range(200)], "impression")
    add("B", [f"b{i}" for i in range(8)], "like")
    add("B", ["a0"], "impression")  # a0 liked A and ignored B: a per-user pair
    for img in "CD":
        add(img, [f"{img.lower()}{i}" for i in range(200)], "impression")
        add(img, [f"{img.lower()}{i}" for i in range(30)], "like")
    add("E", [f"e{i}" for i in range(10)], "impression")
    add("E", [f"e{i}" for i in range(8)], "like")
    add("F", [f"f{i}" for i in range(10)], "impression")
    for img in "GH":
        add(img, [f"{img.lower()}{i}" for i in range(100)], "impression")
        add(img, [f"{img.lower()}{i}" for i in range(10)], "like")
    for e in ("impression", "like", "save", "share", "remix"):
        add("G", ["creatorG"] * 3, e)  # self-engagement
    bot = []
    for j in range(1500):  # a bot: 1500+ events in one day
        bot.append(
            {
                "ts": f"2026-11-03 {j // 3600:02d}:{j // 60 % 60:02d}:{j % 60:02d}",
                "user_id": "bot1",
                "image_id": "ABCDEFGH"[j % 8],
                "event": "impression",
            }
        )
    bot += [
        {"ts": "2026-11-03 23:00:00", "user_id": "bot1", "image_id": "H", "event": e}
        for e in ("like", "remix")
    ]
    return images, ev + bot


@pytest.fixture(scope="module", params=["parquet", "csv"])
def result(request, tmp_path_factory):
    d = write_social_input(tmp_path_factory.mktemp(f"hand_{request.param}"), *_log(), fmt=request.param)
    return build_social_pairs(d, None, CFG)


def _pop(result):
    return result.pairs.filter(pc.field("kind") == "population").to_pylist()


def test_prompts_are_grouped_by_normalised_text_or_prompt_id(result):
    assert (
        normalize_prompt("A red fox, at dawn!")
        == normalize_prompt("a red  fox at dawn")
        == "a red fox at dawn"
    )
    g = dict(
        zip(result.images.column("image_id").to_pylist(), result.images.column("prompt_group").to_pylist())
    )
    assert g["A"] == g["B"] and g["C"] == g["D"] and g["A"] != g["C"]


def test_clear_winner_is_emitted_tie_and_low_exposure_dropped(result):
    pop = _pop(result)
    assert [(p["winner_image_id"], p["loser_image_id"]) for p in pop] == [("A", "B")]
    assert pop[0]["prob"] >= 0.99 and pop[0]["winner_uid"] and pop[0]["loser_uid"]
    assert pop[0]["winner_rate"] > pop[0]["loser_rate"]
    s = result.stats
    assert s["pairs_dropped_low_exposure"] == 1  # E vs F: 10 exposures each
    assert s["pairs_dropped_tie"] >= 1  # C vs D: identical rates
    assert s["pairs_tested"] == 3 and s["pairs_dropped_tie"] + s["pairs_dropped_weak"] == 2


def test_creator_self_engagement_is_ignored(result):
    img = {r["image_id"]: r for r in result.images.to_pylist()}
    assert img["G"]["n_like"] == 10 and img["G"]["n_remix"] == 0 and img["G"]["exposed"] == 100
    assert result.stats["events_self_excluded"] == 15
    assert not any("G" in (p["winner_image_id"], p["loser_image_id"]) for p in _pop(result))


def test_self_engagement_counts_when_asked(tmp_path):
    d = write_social_input(tmp_path, *_log())
    r = build_social_pairs(
        d,
        None,
        SocialConfig(min_exposure=50, exclude_self=False, export_webdataset=False, export_pickapic=False),
    )
    img = {x["image_id"]: x for x in r.images.to_pylist()}
    assert img["G"]["n_like"] == 11 and img["G"]["n_remix"] == 1


def test_bots_are_flagged_and_excluded(result):
    s = result.stats
    assert s["bots_flagged"] == 1 and s["events_bot_excluded"] == 1502
    img = {r["image_id"]: r for r in result.images.to_pylist()}
    assert img["H"]["n_like"] == 10 and img["H"]["n_remix"] == 0 and img["H"]["exposed"] == 100
    assert "bot1" not in result.pairs.column("user_id").to_pylist()


def test_per_user_pairs_and_user_sets(result):
    users = result.pairs.filter(pc.field("kind") == "user").to_pylist()
    assert [(p["user_id"], p["winner_image_id"], p["loser_image_id"]) for p in users] == [("a0", "A", "B")]
    assert result.users.to_pylist() == [{"user_id": "a0", "n_pairs": 1, "n_groups": 1, "n_winner_images": 1}]
    assert draw_user_sets(result.pairs, k=1).column("user_id").to_pylist() == ["a0"]
    assert draw_user_sets(result.pairs, k=2).num_rows == 0


def test_counts_reconcile(result):
    s = result.stats
    assert s["events_in"] == s["events_accepted"] + s["events_rejected"] and s["events_rejected"] == 0
    assert s["image_rows_in"] == s["images_accepted"] + s["images_rejected"]


def test_time_window_splits_prompt_groups(tmp_path):
    images = [
        {"image_id": "X", "prompt": "old fox", "created_at": "2026-11-01 00:00:00"},
        {"image_id": "Y", "prompt": "Old fox!", "created_at": "2026-11-20 00:00:00"},
    ]
    d = write_social_input(tmp_path, images, [])
    cfg = {"export_webdataset": False, "export_pickapic": False}
    same = build_social_pairs(d, None, SocialConfig(**cfg)).images.column("prompt_group").to_pylist()
    split = (
        build_social_pairs(d, None, SocialConfig(window_days=7, **cfg))
        .images.column("prompt_group")
        .to_pylist()
    )
    assert same[0] == same[1] and split[0] != split[1]


def test_fdr_rule_keeps_the_longest_prefix_within_the_level():
    # group g1: errors 0.001, 0.01, 0.04, 0.2 -> running means 0.001, 0.0055, 0.017, 0.063
    # group g2: 0.3 alone -> nothing; order of the input does not matter
    groups = np.array(["g1", "g2", "g1", "g1", "g1"])
    err = np.array([0.04, 0.3, 0.001, 0.2, 0.01])
    assert fdr_select(groups, err, 0.02).tolist() == [True, False, True, False, True]
    assert fdr_select(groups, err, 0.005).tolist() == [False, False, True, False, False]
    assert fdr_select(groups, err, 0.49).tolist() == [True, True, True, True, True]


def test_defaults_keep_pairs_of_images_with_little_exposure(tmp_path):
    """With the defaults, each prompt group's kept pairs have a mean posterior error <= fdr_level, and
    images with fewer than 20 exposures still take part (the posterior already accounts for little
    evidence; the former floor of 20 only lost pairs), each kept pair at P >= min_prob."""
    from pipeline.social.simulate import SimConfig, simulate

    simulate(tmp_path / "social", tmp_path / "truth", SimConfig(n_events=60_000, seed=4, n_bots=0))
    cfg = SocialConfig(export_webdataset=False, export_pickapic=False, user_pairs=False)
    pop = build_social_pairs(tmp_path / "social", None, cfg).pairs.to_pydict()
    err = 1.0 - np.array(pop["prob_margin"])
    groups = np.array(pop["prompt_group"])
    for g in np.unique(groups):
        assert err[groups == g].mean() <= cfg.fdr_level + 1e-12
    assert (err <= 1.0 - cfg.min_prob + 1e-12).all()
    assert (np.minimum(pop["winner_exposure"], pop["loser_exposure"]) < 20).any()


def _surface_log():
    """A and C shown only on a generous surface (featured), B and D only on explore; in both
    prompts the featured image engages 4x more, exactly as much as that surface does."""
    images = [
        {"image_id": "A", "prompt": "red fox", "creator_id": "cA"},
        {"image_id": "B", "prompt": "red fox", "creator_id": "cB"},
        {"image_id": "C", "prompt": "blue owl", "creator_id": "cC"},
        {"image_id": "D", "prompt": "blue owl", "creator_id": "cD"},
    ]
    ev = []
    for img, surface, likes in (
        ("A", "featured", 160),
        ("B", "explore", 40),
        ("C", "featured", 160),
        ("D", "explore", 40),
    ):
        for j in range(400):
            u = f"{img.lower()}{j}"
            ts = f"2026-11-02 {j // 3600:02d}:{j // 60 % 60:02d}:{j % 60:02d}"
            ev.append({"ts": ts, "user_id": u, "image_id": img, "event": "impression", "surface": surface})
            if j < likes:
                ev.append({"ts": ts, "user_id": u, "image_id": img, "event": "like", "surface": surface})
    return images, ev


def test_a_generous_surface_is_an_offset_not_extra_exposure(tmp_path):
    d = write_social_input(tmp_path, *_surface_log())
    r = build_social_pairs(d, None, SocialConfig(export_webdataset=False, export_pickapic=False))
    img = {x["image_id"]: x for x in r.images.to_pylist()}
    assert {k: img[k]["exposed"] for k in "ABCD"} == {
        "A": 400,
        "B": 400,
        "C": 400,
        "D": 400,
    }  # real, never scaled
    assert img["A"]["expected"] > 3.9 * img["B"]["expected"]  # the featured audience predicts 4x
    assert abs(img["A"]["post_mean"] - img["B"]["post_mean"]) < 0.01  # equally engaging for their audiences
    assert r.stats["population_pairs"] == 0
    # without strata the same log reads as A (and C) clearly better
    flat = build_social_pairs(
        d, None, SocialConfig(stratum_column=None, export_webdataset=False, export_pickapic=False)
    )
    assert {(p["winner_image_id"], p["loser_image_id"]) for p in _pop(flat)} == {("A", "B"), ("C", "D")}


def test_user_pairs_need_the_images_shown_together(tmp_path):
    images = [
        {"image_id": "P", "prompt": "tiny robot", "creator_id": "c1"},
        {"image_id": "Q", "prompt": "tiny robot", "creator_id": "c2"},
        {"image_id": "R", "prompt": "tiny robot", "creator_id": "c3"},
    ]
    ev = []

    def add(ts, user, image, *events):
        ev.extend({"ts": ts, "user_id": user, "image_id": image, "event": e} for e in events)

    # together: P and Q within minutes; the user likes and saves P, ignores Q
    add("2026-11-02 10:00:00", "together", "P", "impression", "like", "save")
    add("2026-11-02 10:03:00", "together", "Q", "impression")
    # apart: the same choices two days apart: not one session
    add("2026-11-02 10:00:00", "apart", "P", "impression", "like", "save")
    add("2026-11-04 10:00:00", "apart", "Q", "impression")
    # weak: a click alone is below the minimum evidence
    add("2026-11-02 10:00:00", "weak", "P", "impression", "click")
    add("2026-11-02 10:01:00", "weak", "Q", "impression")
    # never a loser: R was ignored together with P, but liked in another session
    add("2026-11-02 10:00:00", "fan", "P", "impression", "like", "save")
    add("2026-11-02 10:01:00", "fan", "R", "impression")
    add("2026-11-05 10:00:00", "fan", "R", "impression", "like")
    d = write_social_input(tmp_path, images, ev)
    r = build_social_pairs(
        d, None, SocialConfig(user_min_support=0.0, export_webdataset=False, export_pickapic=False)
    )
    users = r.pairs.filter(pc.field("kind") == "user").to_pylist()
    assert [(p["user_id"], p["winner_image_id"], p["loser_image_id"], p["sessions"]) for p in users] == [
        ("together", "P", "Q", 1)
    ]
    gap = build_social_pairs(
        d,
        None,
        SocialConfig(
            session_gap_s=3 * 86_400, user_min_support=0.0, export_webdataset=False, export_pickapic=False
        ),
    )
    got = {(p["user_id"], p["winner_image_id"], p["loser_image_id"]) for p in gap.pairs.to_pylist()}
    assert got == {("together", "P", "Q"), ("apart", "P", "Q")}  # a 3-day session joins them


def test_remix_rings_are_flagged_and_one_way_remixes_are_not(tmp_path):
    members = ["r1", "r2", "r3"]
    images = [
        {"image_id": f"{m}-{k}", "prompt": f"ring image {m} {k}", "creator_id": m}
        for m in members
        for k in range(2)
    ]
    images += [{"image_id": f"y-{k}", "prompt": f"fan image {k}", "creator_id": "y"} for k in range(3)]
    ev = []
    for m in members:
        for other in members:
            if other != m:
                for k in range(2):
                    for e in ("impression", "click", "remix"):
                        ev.append(
                            {
                                "ts": "2026-11-02 10:00:00",
                                "user_id": m,
                                "image_id": f"{other}-{k}",
                                "event": e,
                            }
                        )
    for k in range(3):  # x remixes y's images; y never returns the favour
        for e in ("impression", "click", "remix"):
            ev.append({"ts": "2026-11-02 11:00:00", "user_id": "x", "image_id": f"y-{k}", "event": e})
    r = build_social_pairs(write_social_input(tmp_path, images, ev), None, CFG)
    assert dict(zip(r.bots.column("user_id").to_pylist(), r.bots.column("rule").to_pylist())) == {
        "r1": "ring",
        "r2": "ring",
        "r3": "ring",
    }
    assert r.stats["bots_by_rule"]["ring"] == 3
