"""Configuration of the social preference-pair builder, with documented defaults."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

EVENTS = ("impression", "click", "like", "save", "share", "remix")
POSITIVE_EVENTS = EVENTS[1:]


@dataclass(frozen=True)
class SocialConfig:
    # --- engagement score -------------------------------------------------------------------
    # Weight of each positive event in an image's engagement score. Breadth first: a click weighs
    # most, deeper events less. Deeper events are reached only by users the image already
    # engaged, so they measure how intensely its fans react more than how many people it
    # appeals to, and they favour polarising images over broadly liked ones. On the simulator,
    # where the truth is known, these weights rank pairs better than remix-first weights
    # (remix 1.0, share 0.7, save 0.6, like 0.5, click 0.25): precision at 0.6x the naive yield
    # 0.979 against 0.965 on a 2 M-event log (bench/bench_social.py --weights). Revisit on real
    # labelled data. With dedupe_per_user a user's score on an image is divided by the sum of
    # the weights, so one exposure contributes a value in [0, 1], whose variance is at most its
    # mean: the Poisson model of the test is conservative. Weights must lie in [0, 1].
    weights: dict = field(
        default_factory=lambda: {"click": 1.0, "like": 0.5, "save": 0.25, "share": 0.25, "remix": 0.25}
    )
    # Count each (user, image, event, stratum) at most once: repeated clicks by one user are one vote.
    dedupe_per_user: bool = True
    # Column of the events that names the audience stratum (surface, e.g. following/explore/featured).
    # Each stratum's base rate sets the engagement an exposure there predicts (the offset of the
    # test, see pipeline/social/__init__.py). None: one stratum.
    stratum_column: str | None = "surface"
    # --- grouping ---------------------------------------------------------------------------
    # Images answer the same prompt when they share prompt_id, else the normalised prompt text.
    # window_days: also split groups by the image's creation time (days since 1970 // window).
    window_days: int | None = None
    max_images_per_group: int = 200  # larger groups keep their most exposed images (rest counted)
    # --- population test --------------------------------------------------------------------
    # Gamma-Poisson with offsets (pipeline/social/bayes.py): an image's engagement is Poisson with
    # mean theta * E, E the engagement its real audience predicts (its exposures in each stratum
    # times the stratum's base rate). Exposures are never inflated: an image shown on a generous
    # surface gets a larger E, not more trials.
    # Real exposures (distinct counted users shown the image) each side of a pair needs. Only a
    # guard against images nobody really saw: the posterior already widens with little exposure,
    # and a higher floor dropped pairs the FDR rule would keep at the same measured precision (20
    # -> 5: yield 0.39 -> 0.42 on the popularity-skew log, 0.35 -> 0.40 at 30k; docs/benchmarks.md, social
    # sweep).
    min_exposure: int = 5
    # A pair is a discovery when the winner engages at least min_ratio times as much as the loser
    # (relative to their audiences): P(theta_w > min_ratio * theta_l). With the taste-balanced test
    # (taste_axes > 0) the default 1.0 asks only for the right order: the margin of 1.2 the pooled
    # test needed against polarising images is no longer needed (docs/benchmarks.md, social sweep).
    min_ratio: float = 1.0
    # Posterior expected false discovery rate allowed among the pairs kept in each prompt group: the
    # group's candidate pairs are ranked by their posterior probability of not being a discovery,
    # and the longest prefix whose mean is <= fdr_level is kept (a group of n images tests
    # n(n-1)/2 pairs at once; this bounds the expected share of false ones among those kept) ...
    fdr_level: float = 0.05
    # ... and every kept pair must also have P(theta_w > min_ratio * theta_l) >= min_prob alone.
    # For a posterior that is right, the FDR rule alone is the Bayes-optimal selection and this
    # cut only drops pairs (0.5, i.e. off: +0.4-0.9% yield at 300k events). It stays at 0.75 as a
    # guard against what the posterior cannot see: at 10 M events the ~930 pairs between 0.5 and
    # 0.75 it would add are right only ~65% of the time, and they took the measured precision from
    # 0.957 to 0.950 (docs/benchmarks.md, social sweep).
    min_prob: float = 0.75
    # Split-half calibration (pipeline/social/calibrate.py): fit the log's dispersion from two
    # disjoint halves of every image's audience and widen the posterior by it. False: the Poisson
    # model as it is (phi = 1).
    calibrate: bool = True
    # Taste-balanced test (pipeline/social/taste.py): users are split into 2**taste_axes groups of
    # one taste (median splits of the leading singular vectors of their engagement), the images'
    # posterior log engagement is averaged over the groups, and pairs are decided on that. 0: the
    # pooled Gamma-Poisson test (a polarising image's fans outvote everyone; measured 2-5 points
    # less precise than it claims on simulated logs). Needs dedupe_per_user.
    taste_axes: int = 2
    # users shown fewer images than this say too little about their taste: they count a share in
    # every group
    taste_min_images: int = 5
    tie_margin: float = 0.05  # a dropped pair is a "tie" when |mean_A - mean_B| < tie_margin * prior mean
    # --- bots and self-engagement ----------------------------------------------------------
    exclude_self: bool = True  # events by an image's creator on that image do not count
    bot_min_events: int = 50  # a user is judged by the rate rules only once they have this many events
    bot_max_events_per_day: float = 1000.0  # events per active day above this: bot
    bot_max_positive_ratio: float = 1.5  # positive events / impressions above this: bot
    # remix rings (sql/social_remix_rings.sql): mutual remix edges of >= ring_min_remixes images
    # each way with >= ring_min_partners accounts
    ring_min_remixes: int = 2
    ring_min_partners: int = 2
    # boosters (sql/social_boosters.sql): a user engaged with >= booster_min_images images of one
    # creator and >= booster_min_coverage of that creator's images they were shown. The evidence is
    # how unlikely that many engaged images are if the user's own rate elsewhere and each image's
    # appeal to the rest of its audience (its creator's suspects left out) acted independently: a
    # Chernoff bound of the binomial tail. Nothing about the creator enters: boosting a creator
    # everyone likes is caught as well as boosting an unknown one. Flagged: a tail below
    # booster_max_tail alone, or below booster_suspect_tail when >= booster_min_group users are
    # such suspects of the same creator.
    booster_min_images: int = 2
    booster_min_coverage: float = 0.5
    booster_max_tail: float = 1e-5
    booster_suspect_tail: float = 2e-3
    booster_min_group: int = 3
    # --- per-user pairs ---------------------------------------------------------------------
    user_pairs: bool = True
    # Only from images the user was shown together: the same prompt group, in one session (the
    # user's events on the group's images, split by gaps longer than session_gap_s).
    session_gap_s: int = 1800
    # A user's winner needs a score >= user_min_score in that session, with user_weights (each
    # event kind once); the loser was shown in the same session and the user never engaged with
    # it. With the defaults: a like and more (like + save, like + remix, ...); a click or a like
    # alone is not enough.
    user_weights: dict = field(
        default_factory=lambda: {"click": 0.25, "like": 0.5, "save": 0.6, "share": 0.7, "remix": 1.0}
    )
    user_min_score: float = 1.0
    # ... and the users of the same taste (taste_axes) must not contradict it: the posterior
    # probability, among them, that the winner engages more must be >= user_min_support
    user_min_support: float = 0.8
    max_user_pairs_per_group: int = 20  # per user and prompt group; most sessions, then lowest ids
    # --- exports ----------------------------------------------------------------------------
    # Default exports (webdataset/, pickapic/) hold population pairs only: one row per image pair,
    # never two contradicting labels. Per-user pairs go to per_user/webdataset/ and
    # per_user/pickapic/, with user_id on every row.
    export_webdataset: bool = True
    export_pickapic: bool = True
    shard_max_count: int = 10_000
    shard_max_bytes: int = 1_000_000_000
    # Pick-a-Pic Parquet: a row group closes at this many bytes of images or this many rows,
    # whichever comes first (readers load a row group at a time: bounded memory for image rows)
    pickapic_row_group_bytes: int = 64_000_000
    pickapic_row_group_rows: int = 500
    seed: int = 0  # decides which side the winner goes to in exports (deterministic)
    # held-out pairs for evaluation (reward-model accuracy, DPO implicit accuracy), split by
    # prompt group so no prompt is in both splits
    eval_fraction: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        if not 0.0 <= self.user_min_support < 1.0:
            raise ValueError("user_min_support must be in [0, 1)")
        if not 0 <= self.taste_axes <= 4:
            raise ValueError("taste_axes must be in 0..4")
        if self.taste_axes and not self.dedupe_per_user:
            raise ValueError("taste_axes > 0 needs dedupe_per_user (one vote per user and image)")
        if not 0 < self.fdr_level < 0.5:
            raise ValueError("fdr_level must be in (0, 0.5)")
        if not 0.5 <= self.min_prob < 1:
            raise ValueError("min_prob must be in [0.5, 1)")
        if self.min_ratio < 1:
            raise ValueError("min_ratio must be >= 1")
        for name in ("weights", "user_weights"):
            bad = set(getattr(self, name)) - set(POSITIVE_EVENTS)
            if bad:
                raise ValueError(f"unknown events in {name}: {sorted(bad)}")
        if any(w < 0 or w > 1 for w in self.weights.values()):
            raise ValueError("weights must lie in [0, 1] (the Poisson model needs it)")
        if self.session_gap_s <= 0:
            raise ValueError("session_gap_s must be positive")
        if self.pickapic_row_group_bytes < 1 or self.pickapic_row_group_rows < 1:
            raise ValueError("pickapic_row_group_bytes and pickapic_row_group_rows must be positive")
        if self.stratum_column is not None and not re.fullmatch(
            r"[A-Za-z_][A-Za-z0-9_]*", self.stratum_column
        ):
            raise ValueError(f"stratum_column must be a plain column name, got {self.stratum_column!r}")
        if self.window_days is not None and self.window_days < 1:
            raise ValueError("window_days must be >= 1 or None")
