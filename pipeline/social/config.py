"""Configuration of the social preference-pair builder, with documented defaults."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

EVENTS = ("impression", "click", "like", "save", "share", "remix")
POSITIVE_EVENTS = EVENTS[1:]


@dataclass(frozen=True)
class SocialConfig:
    # --- engagement score -------------------------------------------------------------------
    # Weight of each positive event in an image's engagement score (remix weighs most). With
    # dedupe_per_user a user's score on an image is divided by the sum of the weights, so one
    # exposure contributes a value in [0, 1] whose variance is at most p(1-p): the binomial model
    # of the test is conservative. Weights must lie in [0, 1].
    weights: dict = field(
        default_factory=lambda: {"click": 0.25, "like": 0.5, "save": 0.6, "share": 0.7, "remix": 1.0}
    )
    # Count each (user, image, event, stratum) at most once: repeated clicks by one user are one vote.
    dedupe_per_user: bool = True
    # Column of the events that names the audience stratum (surface, e.g. following/explore/featured).
    # Impressions are standardised across strata (see pipeline/social/__init__.py). None: one stratum.
    stratum_column: str | None = "surface"
    # --- grouping ---------------------------------------------------------------------------
    # Images answer the same prompt when they share prompt_id, else the normalised prompt text.
    # window_days: also split groups by the image's creation time (days since 1970 // window).
    window_days: int | None = None
    max_images_per_group: int = 200  # larger groups keep their most exposed images (rest counted)
    # --- population test --------------------------------------------------------------------
    min_exposure: float = 20.0  # effective (stratum-standardised) exposures each side must have
    level: float = 0.95  # emit A over B when P(rate_A > rate_B) >= level
    prob_method: str = "quadrature"  # "quadrature" (exact up to 1e-6) or "normal" (approximation)
    tie_margin: float = 0.05  # a dropped pair is a "tie" when |mean_A - mean_B| < tie_margin * prior mean
    # --- bots and self-engagement ----------------------------------------------------------
    exclude_self: bool = True  # events by an image's creator on that image do not count
    bot_min_events: int = 50  # a user is judged only once they have this many events
    bot_max_events_per_day: float = 1000.0  # events per active day above this: bot
    bot_max_positive_ratio: float = 1.5  # positive events / impressions above this: bot
    # --- per-user pairs ---------------------------------------------------------------------
    user_pairs: bool = True
    # A user's winner needs a weighted score (weights above, each event kind once, not divided
    # by their sum) >= user_min_score: with the defaults a like or more, a click alone is not
    # enough. The loser was shown to the same user (same prompt group) with no positive event.
    user_min_score: float = 0.3
    max_user_pairs_per_group: int = 20  # per user and prompt group; lowest (winner, loser) ids kept
    # --- exports ----------------------------------------------------------------------------
    export_webdataset: bool = True
    export_pickapic: bool = True
    shard_max_count: int = 10_000
    seed: int = 0  # decides which side the winner goes to in exports (deterministic)
    # held-out pairs for evaluation (reward-model accuracy, DPO implicit accuracy), split by
    # prompt group so no prompt is in both splits
    eval_fraction: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        if not 0.5 < self.level < 1:
            raise ValueError("level must be in (0.5, 1)")
        bad = set(self.weights) - set(POSITIVE_EVENTS)
        if bad:
            raise ValueError(f"unknown events in weights: {sorted(bad)}")
        if any(w < 0 or w > 1 for w in self.weights.values()):
            raise ValueError("weights must lie in [0, 1] (the binomial model needs it)")
        if self.prob_method not in ("quadrature", "normal"):
            raise ValueError("prob_method is 'quadrature' or 'normal'")
        if self.stratum_column is not None and not re.fullmatch(
            r"[A-Za-z_][A-Za-z0-9_]*", self.stratum_column
        ):
            raise ValueError(f"stratum_column must be a plain column name, got {self.stratum_column!r}")
        if self.window_days is not None and self.window_days < 1:
            raise ValueError("window_days must be >= 1 or None")
