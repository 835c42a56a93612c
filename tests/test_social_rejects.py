"""Every reject reason, with counts that reconcile (events in = accepted + rejected)."""

import pyarrow.parquet as pq
import pytest

from pipeline.rejects import REJECT_SCHEMA
from pipeline.social import SocialConfig, build_social_pairs
from pipeline.social.simulate import (
    BAD_EVENT_REASONS,
    BAD_IMAGE_REASONS,
    SimConfig,
    simulate,
    write_social_input,
)

CFG = SocialConfig(min_exposure=10, export_webdataset=False, export_pickapic=False)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    summary = simulate(root / "social", config=SimConfig(n_events=20_000, n_bots=0, inject_bad=2, seed=3))
    return summary, build_social_pairs(root / "social", root / "out", CFG)


def test_every_injected_reason_is_rejected_and_counts_reconcile(bad):
    summary, r = bad
    reasons = r.stats["rejects_by_reason"]
    for reason in BAD_EVENT_REASONS + BAD_IMAGE_REASONS:
        assert reasons.get(reason, 0) >= 2, reason
    s = r.stats
    assert s["events_in"] == summary["events"] == s["events_accepted"] + s["events_rejected"]
    assert s["events_rejected"] == summary["bad_events"]
    assert s["image_rows_in"] == s["images_accepted"] + s["images_rejected"]
    assert s["images_rejected"] == summary["bad_images"]
    assert r.rejects.schema == REJECT_SCHEMA and set(r.rejects.column("stage").to_pylist()) == {"social"}


def test_rejects_are_written_and_traceable(bad):
    _, r = bad
    t = pq.read_table(r.paths["social_rejects"])
    assert t.num_rows == r.rejects.num_rows
    rows = t.to_pylist()
    early = [x for x in rows if x["reason"] == "event before image created"]
    assert early and early[0]["source"].startswith("events-zz-bad.csv:")
    unreadable = [x for x in rows if x["reason"] == "unreadable image"]
    assert unreadable and unreadable[0]["uid"]  # bytes were read: their hash is kept
    assert "0x" not in "".join(x["detail"] for x in rows)  # no memory addresses: deterministic


def test_hand_made_bad_rows_in_parquet(tmp_path):
    images = [
        {"image_id": "A", "prompt": "p", "created_at": "2026-11-02 00:00:00"},
        {"image_id": "", "prompt": "no id"},
        {"image_id": "T", "prompt": "p", "created_at": "yesterday-ish"},
    ]
    events = [
        {"ts": "2026-11-03 10:00:00", "user_id": "u", "image_id": "A", "event": "LIKE", "event_id": "1"},
        {"ts": "2026-11-03 10:00:01", "user_id": "u", "image_id": "A", "event": "like", "event_id": "1"},
        {"ts": "2026-11-01 10:00:00", "user_id": "u", "image_id": "A", "event": "like", "event_id": "2"},
        {"ts": "2026-11-03 10:00:00", "user_id": "u", "image_id": "T", "event": "like", "event_id": "3"},
        {"ts": "2026-13-45 99:00:00", "user_id": "u", "image_id": "A", "event": "like", "event_id": "4"},
        {"ts": "2026-11-03 10:00:00", "user_id": "u", "image_id": "A", "event": "poke", "event_id": "5"},
    ]
    d = write_social_input(tmp_path, images, events)
    r = build_social_pairs(d, None, CFG)
    assert r.stats["rejects_by_reason"] == {
        "duplicate event id": 1,
        "event before image created": 1,
        "image rejected": 1,
        "missing image id": 1,
        "unknown event": 1,
        "unparsable timestamp": 2,  # one image created_at, one event ts
    }
    assert r.stats["events_accepted"] == 1  # "LIKE" is case-normalised and counts


def test_missing_input_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_social_pairs(tmp_path / "nope", None, CFG)


def test_timestamps_with_offsets_are_read_as_utc(tmp_path):
    images = [{"image_id": "A", "prompt": "p", "created_at": "2026-11-02T10:00:00Z"}]
    events = [
        # 11:30+02:00 is 09:30 UTC: before the image existed
        {"ts": "2026-11-02T11:30:00+02:00", "user_id": "u", "image_id": "A", "event": "like"},
        {"ts": "2026-11-02T10:30:00Z", "user_id": "u", "image_id": "A", "event": "like"},
        {"ts": "2026-11-02 10:30:00", "user_id": "v", "image_id": "A", "event": "like"},
    ]
    r = build_social_pairs(write_social_input(tmp_path, images, events, fmt="csv"), None, CFG)
    assert r.stats["rejects_by_reason"] == {"event before image created": 1}


def test_a_build_without_pairs_says_why(tmp_path, bad):
    """A log that gives no pair says why (stats["empty_because"], shown by `make run`'s summary); one with pairs
    says nothing."""
    def reason(name, images, events):
        return build_social_pairs(write_social_input(tmp_path / name, images, events, fmt="csv"), None, CFG).stats["empty_because"]

    def seen(image_id, n, liked):  # n impressions by distinct users, the first `liked` of them liking it
        return ([{"ts": f"2026-11-03T10:{k % 60:02d}:00Z", "user_id": f"u{k}", "image_id": image_id, "event": "impression"}
                 for k in range(n)]
                + [{"ts": f"2026-11-03T11:{k % 60:02d}:00Z", "user_id": f"u{k}", "image_id": image_id, "event": "like"}
                   for k in range(liked)])

    day = "2026-11-01T00:00:00Z"
    assert "1 image(s) accepted" in reason("one", [{"image_id": "A", "prompt": "p", "created_at": day}], seen("A", 30, 5))
    assert "no prompt group holds two images" in reason(
        "apart", [{"image_id": "A", "prompt": "a cat", "created_at": day}, {"image_id": "B", "prompt": "a dog", "created_at": day}],
        seen("A", 30, 5) + seen("B", 30, 5))
    same = reason("same", [{"image_id": "A", "prompt": "p", "created_at": day}, {"image_id": "B", "prompt": "p", "created_at": day}],
                  seen("A", 30, 5) + seen("B", 30, 5))
    assert same.startswith("no reliable winner among 1 image pairs tested")
    assert bad[1].stats["population_pairs"] > 0 and bad[1].stats["empty_because"] == ""
