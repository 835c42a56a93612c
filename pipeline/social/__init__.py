"""Implicit social-feedback preference pairs (after Social Reward / Picsart Image-Social).

What users do with images (open, like, save, share, remix) becomes preference pairs for
Diffusion-DPO: within a prompt, image A is preferred over image B only when it engages its
audience clearly more than B engages its own, with strong Bayesian evidence, after bots and
self-engagement are removed. Per-user pairs keep user_id so that personalised (few-shot) subsets
can be drawn; they have their own exports.

Entry point (what the Dagster asset calls)::

    from pipeline.social import SocialConfig, build_social_pairs
    result = build_social_pairs(social_dir, out_dir, SocialConfig())  # -> SocialResult

Input contract
--------------
A social input folder holding Parquet (.parquet) or CSV (.csv, with a header row) files:

``images.*`` (also ``images-*.*``) - one row per generated image:
    image_id    string, unique (a repeated id: the first row wins, the rest are rejected)
    path        the image file, relative to the social folder or absolute
    prompt      text the image was generated for (required)
    prompt_id   optional; images with the same prompt_id answer the same prompt
    creator_id  optional; the user who made the image (their own events on it do not count)
    created_at  optional timestamp; events before it are rejected
    model       optional; the generator's name (exported as model_0/model_1)

``events*.*`` - the interaction log, usually one file per day (events-2026-11-20.parquet):
    ts          timestamp (or text DuckDB can cast to TIMESTAMP; read as UTC)
    user_id     string
    image_id    string, an image of images.*
    event       one of impression, click, like, save, share, remix (case-insensitive)
    event_id    optional; a repeated event_id keeps its first row (by file name, then row)
    surface     optional audience stratum (e.g. explore / following / featured, or a position
                bucket); the column name is SocialConfig.stratum_column

Every input row either counts or goes to the rejects table (stage "social") with a reason:
images: "missing image id", "duplicate image id", "missing prompt", "unparsable timestamp"
(created_at), "missing image file", "unreadable image" (does not decode, too large, or over the
pixel limit), "duplicate image content" (a repost: the same bytes as another image; the earliest
created, then smallest image_id, stays, and the copy's events count for it, pooled); events: "unparsable timestamp", "unknown event", "missing user id", "image rejected"
(its images row was rejected), "unknown image", "event before image created", "duplicate event id"
(the first failing check names the reason). events in = accepted + rejected, images likewise.
Accepted events by an image's creator on that image (self-engagement) and all events of users
flagged as bots are not rejected but excluded from the counts; both are reported in stats.

How a pair is decided
---------------------
1. Groups: images with the same prompt_id, else the same normalised prompt (NFKC, lowercase,
   punctuation removed, whitespace collapsed); optionally also the same creation window
   (window_days). Groups larger than max_images_per_group keep their most exposed images.
2. Bots (sql/social_user_activity.sql, social_remix_rings.sql, social_boosters.sql; their events
   are excluded everywhere, the accounts listed in social_bots.parquet with the rule that fired):
   rate rules (more than bot_max_events_per_day events per active day, or more than
   bot_max_positive_ratio positive events per impression, once a user has bot_min_events events);
   remix rings (mutual remixes of >= ring_min_remixes images each way with >= ring_min_partners
   accounts); boosters (a user engaged with >= booster_min_images images of one creator, at least
   booster_min_coverage of those shown, far more than the user's rate elsewhere times each image's
   appeal to the rest of its audience predicts: a Chernoff bound of the binomial tail below
   booster_max_tail, or below booster_suspect_tail for >= booster_min_group users of one creator;
   the creator's popularity does not enter).
3. Engagement per image: with dedupe_per_user each user counts once per image, stratum and event
   kind; K = sum over positive events of weight * count, divided by the sum of the weights (so a
   user contributes a value in [0, 1]). The weights are breadth first (a click weighs most).
4. Audience offsets: the base rate of each stratum s is b_s = sum K / sum exposures over all
   images. An image's expected engagement is E = sum_s n_s * b_s with n_s its REAL exposures
   (distinct counted users) in s: an image shown to a generous audience (followers, the featured
   slot) is expected to engage more; its exposures are never scaled.
5. Model: K ~ Poisson(theta * E) (conservative: one user's contribution has variance at most its
   mean), theta ~ Gamma(alpha, beta) fitted to the images with >= min_exposure exposures (method
   of moments, then negative-binomial maximum likelihood; valid for alpha below 1). Split-half
   calibration (calibrate.py): a dispersion phi fitted on two random halves of the users; counts
   are divided by max(phi, 1). Taste groups (taste.py, taste_axes=2): users split at the medians
   of the two leading singular vectors of their engagement; per group and image a posterior
   Gamma(alpha + K_g, beta + E_g); an image's score is the mean over groups of E[log theta_g].
6. Test: for each pair of a group with both sides at >= min_exposure exposures, the posterior
   probability that the better-looking image engages at least min_ratio (default 1: the right
   order) times as much as the other, from the taste-balanced scores (normal approximation;
   taste_axes=0: the pooled closed form in bayes.py). Per prompt group, pairs are ranked by 1 - that
   probability and the longest prefix whose mean is <= fdr_level (default 5%) is kept, each kept
   pair also needing the probability >= min_prob. Dropped pairs are counted: low exposure, group
   overflow, tie (posterior means within tie_margin * prior mean) or weak evidence (the rest). The
   kept pairs' mean probability of the right order is the estimated precision (stats, with a 95%
   interval), next to the yield against the naive rule.
7. Per-user pairs (sql/social_user_pairs.sql): only images the user was shown together, in one
   session of a prompt group (the user's events on the group's images, split by gaps longer than
   session_gap_s, default 30 minutes). The winner scores >= user_min_score with user_weights in
   that session (a like and more); the loser was shown in the same session and never engaged by
   that user; users of the same taste group must support the order (posterior >= user_min_support,
   the pair's prob). One row per (user, winner, loser), with the number of sessions; at most
   max_user_pairs_per_group per user and group. draw_user_sets() draws k pairs per user
   deterministically (PPD-style few-shot sets).

Outputs under out_dir: social_pairs.parquet (PAIR_SCHEMA), social_users.parquet,
social_images.parquet (per-image evidence and accepted events), social_bots.parquet,
social_rejects.parquet (REJECT_SCHEMA), social_stats.json; exports (pipeline/social/export.py):
webdataset/{train,eval}/ and pickapic/ with the population pairs only (one row per image pair,
never contradicting), per_user/webdataset/{train,eval}/ and per_user/pickapic/ with the per-user
pairs (user_id on every row). WebDataset: social-<split>-NNNNNN.tar with <pair_id>.0.jpg, .1.jpg,
.json (caption, label_0, label_1, user_id, uids, evidence), manifest.json per split, split by
prompt group. Pick-a-Pic v2 columns in train-/validation-NNNNN-of-NNNNN.parquet, for
datasets.load_dataset("parquet", data_dir=...). pipeline/social/checks.py re-reads all of it.
"""

from pipeline.social.bayes import (
    BetaPrior,
    GammaPrior,
    fit_beta_prior,
    fit_gamma_prior,
    prob_greater,
    prob_greater_gamma,
)
from pipeline.social.build import PAIR_SCHEMA, SocialResult, build_social_pairs
from pipeline.social.config import EVENTS, POSITIVE_EVENTS, SocialConfig
from pipeline.social.ingest import normalize_prompt
from pipeline.social.users import draw_user_sets

__all__ = [
    "EVENTS",
    "PAIR_SCHEMA",
    "POSITIVE_EVENTS",
    "BetaPrior",
    "GammaPrior",
    "SocialConfig",
    "SocialResult",
    "build_social_pairs",
    "draw_user_sets",
    "fit_beta_prior",
    "fit_gamma_prior",
    "normalize_prompt",
    "prob_greater",
    "prob_greater_gamma",
]
