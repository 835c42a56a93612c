"""Implicit social-feedback preference pairs (after Social Reward / Picsart Image-Social).

What users do with images (open, like, save, share, remix) becomes preference pairs for
Diffusion-DPO: within a prompt, image A is preferred over image B only when its exposure-adjusted
engagement rate is higher with strong Bayesian evidence. Per-user pairs keep user_id so that
personalised (few-shot) subsets can be drawn.

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
pixel limit); events: "unparsable timestamp", "unknown event", "missing user id", "image rejected"
(its images row was rejected), "unknown image", "event before image created", "duplicate event id"
(the first failing check names the reason). events in = accepted + rejected, images likewise.
Accepted events by an image's creator on that image (self-engagement) and all events of users
flagged as bots are not rejected but excluded from the counts; both are reported in stats.

How a pair is decided
---------------------
1. Groups: images with the same prompt_id, else the same normalised prompt (NFKC, lowercase,
   punctuation removed, whitespace collapsed); optionally also the same creation window
   (window_days). Groups larger than max_images_per_group keep their most exposed images.
2. Bots: a user with at least bot_min_events accepted events is a bot when they average more than
   bot_max_events_per_day events per active day or leave more than bot_max_positive_ratio positive
   events per impression. Their events are excluded everywhere.
3. Engagement per image: with dedupe_per_user each user counts once per image, stratum and event
   kind. score = sum over positive events of weight * count (remix weighs most; weights <= 1).
4. Exposure control (indirect standardisation over audience strata): the base rate of each
   stratum s is b_s = sum score / sum exposed users over all images. An image's effective exposure
   is n_eff = sum_s n_s * b_s / b, b the overall rate: an impression on a surface where everything
   engages more (followers, the featured slot) counts for more than one, so an image shown mostly
   to the creator's followers or in the featured slot is not credited for that audience's
   generosity. rate = score / n_eff.
5. Prior: Beta(alpha, beta) fitted by the method of moments to the per-image rates of images with
   n_eff >= min_exposure, after subtracting binomial sampling noise from their variance.
6. Test: posteriors Beta(alpha + score, beta + n_eff - score); P(rate_A > rate_B) by 128-point
   Gauss-Legendre quadrature of pdf_A * CDF_B (prob_method="quadrature", accurate to ~1e-6) or a
   normal approximation ("normal"). A pair needs both sides at n_eff >= min_exposure and
   P >= level (default 0.95) one way or the other. Dropped pairs are counted: low exposure, group
   overflow, tie (posterior means within tie_margin * prior mean) or weak evidence (the rest).
7. Per-user pairs: the user engaged with A (score >= user_min_score) and was shown B of the same
   prompt group without any positive event on B; at most max_user_pairs_per_group per user and
   group. draw_user_sets() draws k pairs per user deterministically.

Outputs under out_dir: social_pairs.parquet (PAIR_SCHEMA), social_users.parquet,
social_images.parquet (per-image evidence), social_rejects.parquet (REJECT_SCHEMA),
social_stats.json, webdataset/{train,eval}/ (split by prompt group; social-<split>-NNNNNN.tar: <pair_id>.0.jpg, .1.jpg, .json with caption,
label_0, label_1, user_id, uids and evidence; manifest.json) and pickapic/ (Pick-a-Pic v2
columns in train-/validation-NNNNN-of-NNNNN.parquet, for datasets.load_dataset("parquet", data_dir=...)).
"""

from pipeline.social.bayes import BetaPrior, fit_beta_prior, prob_greater
from pipeline.social.build import PAIR_SCHEMA, SocialResult, build_social_pairs
from pipeline.social.config import EVENTS, POSITIVE_EVENTS, SocialConfig
from pipeline.social.ingest import normalize_prompt
from pipeline.social.users import draw_user_sets

__all__ = [
    "EVENTS",
    "PAIR_SCHEMA",
    "POSITIVE_EVENTS",
    "BetaPrior",
    "SocialConfig",
    "SocialResult",
    "build_social_pairs",
    "draw_user_sets",
    "fit_beta_prior",
    "normalize_prompt",
    "prob_greater",
]
