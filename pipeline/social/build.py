"""build_social_pairs: interaction logs -> population and per-user preference pairs (+ exports)."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.ids import stable_key
from pipeline.rejects import REJECT_SCHEMA, Rejects
from pipeline.social.bayes import GammaPrior, fit_gamma_prior, gamma_posterior, prob_greater_gamma
from pipeline.social.calibrate import estimated_precision, fit_dispersion
from pipeline.social.config import POSITIVE_EVENTS, SocialConfig
from pipeline.social.ingest import find_inputs, load_images, load_sql, register_events
from pipeline.social.taste import balanced_log_rate, prob_greater_log, taste_cells
from pipeline.storage import write_bytes_atomic, write_parquet_atomic

STAGE = "social"

PAIR_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("kind", pa.string()),  # "population" | "user"
        ("user_id", pa.string()),  # null for population pairs
        ("prompt", pa.string()),  # the prompt both images answer (the export's caption)
        ("prompt_group", pa.string()),
        ("winner_image_id", pa.string()),
        ("loser_image_id", pa.string()),
        ("winner_uid", pa.string()),
        ("loser_uid", pa.string()),
        (
            "prob",
            pa.float64(),
        ),  # posterior P(theta_winner > theta_loser); user pairs: the same among users of their taste
        # posterior P(theta_winner > min_ratio * theta_loser): what the FDR rule ranks; null for user pairs
        ("prob_margin", pa.float64()),
        # population: real exposures (distinct counted users shown the image);
        # user: the user's impressions of the image in the sessions that showed both
        ("winner_exposure", pa.float64()),
        ("loser_exposure", pa.float64()),
        ("winner_impressions", pa.int64()),  # impression events (population) / the user's impressions
        ("loser_impressions", pa.int64()),
        ("winner_expected", pa.float64()),  # engagement the image's audiences predict (population)
        ("loser_expected", pa.float64()),
        ("winner_score", pa.float64()),  # weighted engagement (population) / the user's score
        ("loser_score", pa.float64()),
        ("winner_rate", pa.float64()),  # posterior mean of theta: engagement / expected (population)
        ("loser_rate", pa.float64()),
        ("sessions", pa.int64()),  # user pairs: sessions that showed both images; null for population
    ]
)


@dataclass
class SocialResult:
    pairs: pa.Table  # PAIR_SCHEMA, population pairs then user pairs
    users: pa.Table  # user_id, n_pairs, n_groups, n_winner_images
    images: pa.Table  # per accepted image: exposures, score, expected, posterior
    rejects: pa.Table  # REJECT_SCHEMA, stage "social"
    stats: dict
    prior: GammaPrior | None = None
    baseline: pa.Table | None = None  # naive-rule pairs when asked for
    bots: pa.Table | None = None  # user_id, rule (rate / ring / booster), detail
    paths: dict = field(default_factory=dict)


def _comb2(x):
    x = np.asarray(x, dtype=np.int64)
    return x * (x - 1) // 2


def _pair_ids(kind: str, users, winners, losers) -> list[str]:
    return [stable_key("social", kind, u or "", w, l) for u, w, l in zip(users, winners, losers)]


def fdr_select(groups: np.ndarray, error_prob: np.ndarray, level: float) -> np.ndarray:
    """Posterior expected-FDR rule, per group: in each group, rank the candidates by their
    posterior probability of being wrong and keep the longest prefix whose mean is <= level (the
    expected share of wrong pairs among those kept). Returns a boolean mask."""
    groups = np.asarray(groups)
    err = np.asarray(error_prob, dtype=np.float64)
    keep = np.zeros(err.size, dtype=bool)
    if err.size == 0:
        return keep
    order = np.lexsort((np.arange(err.size), err, groups))  # by group, then error, then position
    g, e = groups[order], err[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    bounds = np.r_[starts, g.size]
    for a, b in itertools.pairwise(bounds):
        running = np.cumsum(e[a:b]) / np.arange(1, b - a + 1)
        ok = np.flatnonzero(running <= level)
        if ok.size:
            keep[order[a : a + ok[-1] + 1]] = True
    return keep


def empty_reason(stats: dict, cfg: SocialConfig) -> str:
    """Why a build gave no pair at all (population or per user), in words for a run's summary; "" when it gave some."""
    if stats["population_pairs"] or stats["user_pairs"]:
        return ""
    if stats["images_accepted"] < 2:
        return f"{stats['images_accepted']} image(s) accepted: a pair needs two in one prompt group"
    if not stats["image_pairs_total"]:
        return f"no prompt group holds two images ({stats['prompt_groups']} groups of one)"
    low = stats["pairs_dropped_low_exposure"]
    return (f"no reliable winner among {stats['pairs_tested']} image pairs tested ({stats['pairs_dropped_weak']} not reliable at "
            f"FDR {stats['fdr_level']}, {stats['pairs_dropped_tie']} ties)"
            + (f"; {low} pairs untested, a side under {cfg.min_exposure} exposures" if low else ""))


def build_social_pairs(
    social_dir: Path,
    out_dir: Path | None = None,
    config: SocialConfig | None = None,
    *,
    partition: str = "",
    baseline: bool = False,
    threads: int | None = None,
    version: str | None = None,
    removed_users: set[str] | None = None,
) -> SocialResult:
    """Read the social input folder, write social_pairs / social_users / social_images /
    social_bots / social_rejects Parquet tables and the exports (population pairs:
    webdataset/{train,eval}, pickapic/; per-user pairs: per_user/webdataset/{train,eval},
    per_user/pickapic/) under out_dir (nothing is written when out_dir is None), and return the
    tables and stats.

    baseline=True also computes the naive rule's pairs (raw remix, then like counts; no exposure
    normalisation, no test, bots and creators included) over the same accepted events.

    ``version``: the dataset version id the manifests record. ``removed_users``: sha256 hex digests of
    user ids removed on request (pipeline.removals): their images (as creator) and their events (as
    actor) become "removed on request" rejects."""
    cfg = config or SocialConfig()
    cfg.validate()
    timings: dict[str, float] = {}
    t_all = t = time.perf_counter()

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        timings[name] = round(now - t, 4)
        t = now

    social_dir = Path(social_dir)
    rejects = Rejects(STAGE, partition)
    image_files, event_files = find_inputs(social_dir)
    removed_users = set(removed_users or ())
    imgs = load_images(social_dir, image_files, rejects, cfg.window_days, removed_creators=removed_users)
    images = imgs.table.sort_by("image_id")
    lap("images")

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    con.register("images_ok", images.select(["image_id", "prompt_group", "creator_id", "created_at"]))
    con.register("images_rejected", pa.table({"image_id": pa.array(imgs.rejected_ids, pa.string())}))
    con.register("reposts", imgs.copies)
    con.register("removed_users", pa.table({"user_hash": pa.array(sorted(removed_users), pa.string())}))
    file_rejects = Rejects(STAGE, partition)  # unreadable event files and rows that do not parse
    n_file_rejects = register_events(con, social_dir, event_files, cfg.stratum_column, file_rejects)
    con.execute("CREATE TEMP TABLE dup_rows AS " + load_sql("social_duplicate_events"))
    con.execute("CREATE TEMP VIEW ev_classified AS " + load_sql("social_events_classified"))
    lap("classify_events")

    ev_rejects = _q(con, load_sql("social_event_rejects"))
    n = ev_rejects.num_rows
    ev_rej_table = pa.table(
        {
            "source": ev_rejects.column("source"),
            "stage": pa.array([STAGE] * n, pa.string()),
            "reason": ev_rejects.column("reason"),
            "detail": ev_rejects.column("detail"),
            "partition": pa.array([partition] * n, pa.string()),
            "uid": pa.nulls(n, pa.string()),
        },
        schema=REJECT_SCHEMA,
    )
    all_rejects = pa.concat_tables([rejects.to_table(), file_rejects.to_table(), ev_rej_table])
    raw = _q(con, load_sql("social_image_raw_counts"))  # also the accepted events per image
    n_accepted = int(pc.sum(raw.column("events_accepted")).as_py() or 0)
    n_read = con.sql("SELECT count(*) FROM events_src").fetchall()[0][0]
    lap("rejects")

    # --- bots: rate rules, remix rings, boosters ----------------------------------------------
    activity = _q(
        con,
        load_sql("social_user_activity"),
        {
            "min_events": cfg.bot_min_events,
            "max_per_day": cfg.bot_max_events_per_day,
            "max_positive_ratio": cfg.bot_max_positive_ratio,
        },
    )
    con.execute("CREATE TEMP TABLE user_image AS " + load_sql("social_user_image"))
    rings = _q(
        con,
        load_sql("social_remix_rings"),
        {"min_remixes": cfg.ring_min_remixes, "min_partners": cfg.ring_min_partners},
    )
    flagged = sorted(
        set(activity.filter(pc.field("is_bot")).column("user_id").to_pylist())
        | set(rings.column("user_id").to_pylist())
    )
    con.register("flagged", pa.table({"user_id": pa.array(flagged, pa.string())}))
    boosters = _q(
        con,
        load_sql("social_boosters"),
        {
            "min_images": cfg.booster_min_images,
            "min_coverage": cfg.booster_min_coverage,
            "max_tail": cfg.booster_max_tail,
            "suspect_tail": cfg.booster_suspect_tail,
            "min_group": cfg.booster_min_group,
        },
    )
    bots = _bot_table(activity, rings, boosters)
    con.register("bots", bots.select(["user_id"]))
    n_events_by_user = dict(
        zip(activity.column("user_id").to_pylist(), activity.column("n_events").to_pylist())
    )
    n_bot_events = int(sum(n_events_by_user.get(u, 0) for u in bots.column("user_id").to_pylist()))
    n_self = int(pc.sum(activity.column("n_self_events")).as_py() or 0)
    lap("bots")

    counts = _q(
        con,
        load_sql("social_image_stratum_counts"),
        {"dedupe": cfg.dedupe_per_user, "exclude_self": cfg.exclude_self},
    )
    lap("aggregate")

    # --- per-image engagement and the engagement its audience predicts (numpy, fixed order) ----
    image_ids = images.column("image_id").to_pylist()
    index = {iid: i for i, iid in enumerate(image_ids)}
    strata = sorted(set(counts.column("stratum").to_pylist()))
    s_index = {s: j for j, s in enumerate(strata)}
    n_img, n_str = len(image_ids), max(len(strata), 1)
    rows = np.array([index[x] for x in counts.column("image_id").to_pylist()], dtype=np.int64)
    cols = np.array([s_index[x] for x in counts.column("stratum").to_pylist()], dtype=np.int64)
    halves = counts.column("half").to_numpy().astype(np.int64)
    # per audience half (users split by a hash of their id), image and stratum; the full counts
    # are their sum (the halves are only for calibrate.fit_dispersion)
    Nh = np.zeros((2, n_img, n_str))
    Kh = np.zeros((2, n_img, n_str))
    np.add.at(Nh, (halves, rows, cols), counts.column("n_exposed").to_numpy().astype(np.float64))
    impressions = np.zeros(n_img)
    np.add.at(impressions, rows, counts.column("n_impressions").to_numpy().astype(np.float64))
    raw_events = {}
    for e in POSITIVE_EVENTS:
        c = np.zeros((2, n_img, n_str))
        np.add.at(c, (halves, rows, cols), counts.column(f"n_{e}").to_numpy().astype(np.float64))
        raw_events[e] = c.sum(axis=(0, 2))
        Kh += cfg.weights.get(e, 0.0) * c
    if cfg.dedupe_per_user:
        # a user's contribution per image and stratum is sum_e w_e x_e <= sum_e w_e; scaled to [0, 1]
        # the score of one exposure has a variance at most its mean: the Poisson model is conservative
        Kh /= max(sum(cfg.weights.get(e, 0.0) for e in POSITIVE_EVENTS), 1e-12)
    N, K = Nh.sum(axis=0), Kh.sum(axis=0)
    tot_n, tot_k = N.sum(), K.sum()
    base_all = tot_k / tot_n if tot_n > 0 else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        base_s = np.where(N.sum(axis=0) > 0, K.sum(axis=0) / N.sum(axis=0), base_all)
    exposed = N.sum(axis=1)  # real exposures, never scaled
    expected = (N * base_s[None, :]).sum(axis=1)  # the offset: what the audience predicts
    score = K.sum(axis=1)
    groups = images.column("prompt_group").to_pylist()
    order = sorted(range(n_img), key=lambda i: (groups[i], -exposed[i], image_ids[i]))
    group_rank = np.zeros(n_img, dtype=np.int64)
    prev, r = None, 0
    for i in order:
        r = r + 1 if groups[i] == prev else 1
        prev = groups[i]
        group_rank[i] = r
    img_stats = pa.table(
        {
            "idx": np.arange(n_img, dtype=np.int64),
            "image_id": images.column("image_id"),
            "prompt_group": images.column("prompt_group"),
            "exposed": exposed,
            "group_rank": group_rank,
        }
    )
    con.register("img_stats", img_stats)
    cand = _q(
        con,
        load_sql("social_candidate_pairs"),
        {"min_exposure": cfg.min_exposure, "max_per_group": cfg.max_images_per_group},
    )
    ia = cand.column("ia").to_numpy().astype(np.int64)
    ib = cand.column("ib").to_numpy().astype(np.int64)
    g_codes = {g: j for j, g in enumerate(sorted(set(groups)))}
    gi = np.array([g_codes[g] for g in groups], dtype=np.int64)

    # prior, then the log's own dispersion from its two audience halves (calibrate.py), then the
    # prior again with each count worth 1 / phi of an observation
    fit_sel = exposed >= cfg.min_exposure
    if cfg.min_exposure <= 0 or fit_sel.sum() < 2:
        fit_sel = np.ones(n_img, dtype=bool)
    prior = fit_gamma_prior(score[fit_sel], expected[fit_sel])
    lap("prior")
    dispersion = None
    phi = 1.0
    if cfg.calibrate:
        score_h = Kh.sum(axis=2)
        expected_h = (Nh * base_s[None, None, :]).sum(axis=2)
        dispersion = fit_dispersion(prior.alpha, prior.beta, score_h, expected_h, ia, ib, gi[ia])
        # never narrower than the Poisson model: a score in [0, 1] per user already has variance
        # at most its mean, and what the halves cannot see (a bias both halves share) is no reason
        # to trust the data more than that
        phi = max(dispersion.phi, 1.0)
        prior = fit_gamma_prior(score[fit_sel] / phi, expected[fit_sel] / phi)
        lap("calibrate")
    a_post, b_post = gamma_posterior(prior, score / phi, expected / phi)
    post_mean = a_post / b_post
    r_min = cfg.min_ratio
    n_cells, singular, cell_of_user = 1, np.zeros(0), {}
    if cfg.taste_axes > 0:
        # taste-balanced test (taste.py): the pair's order within groups of users of one taste,
        # combined on the log scale, so that a polarising image's fans do not outvote everyone
        cu = _q(con, load_sql("social_counted_user_image"), {"exclude_self": cfg.exclude_self})
        u_codes = pc.dictionary_encode(cu.column("user_id")).combine_chunks()
        cu_user = u_codes.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        # vectorised lookups (millions of rows at 10 M events): positions in the sorted image ids / strata
        cu_img = (
            pc.index_in(cu.column("image_id"), value_set=images.column("image_id"))
            .to_numpy(zero_copy_only=False)
            .astype(np.int64)
        )
        cu_str = (
            pc.index_in(cu.column("stratum"), value_set=pa.array(strata, pa.string()))
            .to_numpy(zero_copy_only=False)
            .astype(np.int64)
        )
        w_sum = max(sum(cfg.weights.get(e, 0.0) for e in POSITIVE_EVENTS), 1e-12)
        cu_score = (
            sum(cfg.weights.get(e, 0.0) * cu.column(e).to_numpy().astype(np.float64) for e in POSITIVE_EVENTS)
            / w_sum
        )
        cells, singular = taste_cells(cu_user, cu_img, cu_score, n_img, cfg.taste_axes, cfg.taste_min_images)
        n_cells = 2**cfg.taste_axes
        k_cells = np.zeros((n_cells, n_img))
        e_cells = np.zeros((n_cells, n_img))
        cu_cell = cells[cu_user] if cu_user.size else cu_user
        known = cu_cell >= 0
        np.add.at(k_cells, (cu_cell[known], cu_img[known]), cu_score[known])
        np.add.at(e_cells, (cu_cell[known], cu_img[known]), base_s[cu_str[known]])
        # users whose taste is unknown count a share in every cell
        k_cells += np.bincount(cu_img[~known], weights=cu_score[~known], minlength=n_img)[None, :] / n_cells
        e_cells += (
            np.bincount(cu_img[~known], weights=base_s[cu_str[~known]], minlength=n_img)[None, :] / n_cells
        )
        cell_of_user = dict(zip(u_codes.dictionary.to_pylist(), cells.tolist()))
        del cu, u_codes
        log_mean, log_var = balanced_log_rate(prior.alpha, prior.beta, k_cells / phi, e_cells / phi)

        def prob_test(x, y, margin=1.0):
            return prob_greater_log(log_mean[x], log_var[x], log_mean[y], log_var[y], np.log(margin))

        lap("taste")
    else:

        def prob_test(x, y, margin=1.0):
            return prob_greater_gamma(a_post[x], b_post[x], a_post[y], b_post[y] / margin)

    p = prob_test(ia, ib) if ia.size else np.zeros(0)
    p_a = prob_test(ia, ib, r_min) if ia.size else np.zeros(0)
    p_b = prob_test(ib, ia, r_min) if ia.size else np.zeros(0)
    a_wins = p_a >= p_b
    p_margin = np.where(a_wins, p_a, p_b)  # P(winner >= min_ratio x loser), the decision's evidence
    emit = fdr_select(gi[ia], 1.0 - p_margin, cfg.fdr_level) & (p_margin >= cfg.min_prob)
    dropped = ~emit
    tie = dropped & (np.abs(post_mean[ia] - post_mean[ib]) < cfg.tie_margin * prior.mean)
    weak = dropped & ~tie
    win = np.where(a_wins, ia, ib)[emit]
    lose = np.where(a_wins, ib, ia)[emit]
    pwin = np.where(a_wins, p, 1 - p)[emit]
    # estimated precision of the kept pairs (posterior probability of the right order), also under
    # the widest dispersion the split halves allow
    pwin_wide = None
    if dispersion is not None and win.size:
        phi_hi = max(dispersion.high, 1.0)
        if cfg.taste_axes > 0:
            m_w, v_w = balanced_log_rate(prior.alpha, prior.beta, k_cells / phi_hi, e_cells / phi_hi)
            pwin_wide = prob_greater_log(m_w[win], v_w[win], m_w[lose], v_w[lose])
        else:
            a_w, b_w = gamma_posterior(prior, score / phi_hi, expected / phi_hi)
            pwin_wide = prob_greater_gamma(a_w[win], b_w[win], a_w[lose], b_w[lose])
    precision_est = estimated_precision(pwin, pwin_wide)
    pmargin = p_margin[emit]

    # pair accounting per group: all pairs = low exposure + overflow + candidates
    m_g = np.bincount(gi, minlength=len(g_codes))
    x_g = np.bincount(gi, weights=(exposed >= cfg.min_exposure), minlength=len(g_codes)).astype(np.int64)
    y_g = np.minimum(x_g, cfg.max_images_per_group)
    lap("test")

    uids = images.column("uid").to_pylist()
    caption = _captions(groups, images.column("prompt").to_pylist())
    win_ids = [image_ids[i] for i in win]
    lose_ids = [image_ids[i] for i in lose]
    n_pop = len(win_ids)
    pop = pa.table(
        {
            "pair_id": _pair_ids("population", [None] * n_pop, win_ids, lose_ids),
            "kind": ["population"] * n_pop,
            "user_id": pa.nulls(n_pop, pa.string()),
            "prompt": [caption(int(w), int(l)) for w, l in zip(win, lose)],
            "prompt_group": [groups[i] for i in win],
            "winner_image_id": win_ids,
            "loser_image_id": lose_ids,
            "winner_uid": [uids[i] for i in win],
            "loser_uid": [uids[i] for i in lose],
            "prob": pwin,
            "prob_margin": pmargin,
            "winner_exposure": exposed[win],
            "loser_exposure": exposed[lose],
            "winner_impressions": impressions[win].astype(np.int64),
            "loser_impressions": impressions[lose].astype(np.int64),
            "winner_expected": expected[win],
            "loser_expected": expected[lose],
            "winner_score": score[win],
            "loser_score": score[lose],
            "winner_rate": post_mean[win],
            "loser_rate": post_mean[lose],
            "sessions": pa.nulls(n_pop, pa.int64()),
        },
        schema=PAIR_SCHEMA,
    )

    # --- per-user pairs ----------------------------------------------------------------------------
    user_pairs = PAIR_SCHEMA.empty_table()
    n_user_sessions_pairs = 0
    n_user_unsupported = 0
    user_support = np.zeros(0)
    if cfg.user_pairs:
        con.execute(
            "CREATE TEMP TABLE engaged_groups AS SELECT DISTINCT user_id, prompt_group FROM user_image "
            "WHERE c_click + c_like + c_save + c_share + c_remix > 0 AND NOT (is_self AND $exclude_self) "
            "AND user_id NOT IN (SELECT user_id FROM bots)",
            {"exclude_self": cfg.exclude_self},
        )
        w = cfg.user_weights
        up = _q(
            con,
            load_sql("social_user_pairs"),
            {f"w_{e}": float(w.get(e, 0.0)) for e in POSITIVE_EVENTS}
            | {
                "min_score": cfg.user_min_score,
                "max_per_group": cfg.max_user_pairs_per_group,
                "session_gap_s": cfg.session_gap_s,
                "exclude_self": cfg.exclude_self,
            },
        )
        # support: P(theta_winner > theta_loser) among users of the same taste (their group's
        # posterior; the taste-balanced one for a user whose taste is unknown; the pooled one without
        # taste groups). A user's single choice is weak evidence: pairs their taste group clearly
        # contradicts are dropped, and the mean support of the rest is their estimated precision.
        wi = np.array([index[x] for x in up.column("winner_image_id").to_pylist()], dtype=np.int64)
        li = np.array([index[x] for x in up.column("loser_image_id").to_pylist()], dtype=np.int64)
        if cfg.taste_axes > 0:
            uc = np.array([cell_of_user.get(u, -1) for u in up.column("user_id").to_pylist()], dtype=np.int64)
            a_c, b_c = prior.alpha + k_cells / phi, prior.beta + e_cells / phi
            cc = np.maximum(uc, 0)
            support = (
                np.where(
                    uc >= 0,
                    prob_greater_gamma(a_c[cc, wi], b_c[cc, wi], a_c[cc, li], b_c[cc, li]),
                    prob_greater_log(log_mean[wi], log_var[wi], log_mean[li], log_var[li]),
                )
                if wi.size
                else np.zeros(0)
            )
        else:
            support = (
                prob_greater_gamma(a_post[wi], b_post[wi], a_post[li], b_post[li]) if wi.size else np.zeros(0)
            )
        supported = support >= cfg.user_min_support
        n_user_unsupported = int((~supported).sum())
        up = up.filter(pa.array(supported, pa.bool_()))
        user_support = support[supported]
        wi, li = wi[supported].tolist(), li[supported].tolist()
        m = up.num_rows
        users_col = up.column("user_id").to_pylist()
        n_user_sessions_pairs = int(pc.sum(up.column("sessions")).as_py() or 0)
        user_pairs = pa.table(
            {
                "pair_id": _pair_ids(
                    "user",
                    users_col,
                    up.column("winner_image_id").to_pylist(),
                    up.column("loser_image_id").to_pylist(),
                ),
                "kind": ["user"] * m,
                "user_id": users_col,
                "prompt": [caption(a, b) for a, b in zip(wi, li)],
                "prompt_group": up.column("prompt_group"),
                "winner_image_id": up.column("winner_image_id"),
                "loser_image_id": up.column("loser_image_id"),
                "winner_uid": [uids[i] for i in wi],
                "loser_uid": [uids[i] for i in li],
                "prob": pa.array(user_support, pa.float64()),  # support among users of the same taste
                "prob_margin": pa.nulls(m, pa.float64()),
                "winner_exposure": pc.cast(up.column("winner_impressions"), pa.float64()),
                "loser_exposure": pc.cast(up.column("loser_impressions"), pa.float64()),
                "winner_impressions": pc.cast(up.column("winner_impressions"), pa.int64()),
                "loser_impressions": pc.cast(up.column("loser_impressions"), pa.int64()),
                "winner_expected": pa.nulls(m, pa.float64()),
                "loser_expected": pa.nulls(m, pa.float64()),
                "winner_score": pc.cast(up.column("winner_score"), pa.float64()),
                "loser_score": pa.array(np.zeros(m)),
                "winner_rate": pa.nulls(m, pa.float64()),
                "loser_rate": pa.nulls(m, pa.float64()),
                "sessions": pc.cast(up.column("sessions"), pa.int64()),
            },
            schema=PAIR_SCHEMA,
        )
    pairs = pa.concat_tables([pop, user_pairs])
    con.register("pairs_out", user_pairs.select(["user_id", "prompt_group", "winner_image_id"]))
    users = _q(
        con,
        "SELECT user_id, count(*)::BIGINT AS n_pairs, count(DISTINCT prompt_group)::BIGINT AS n_groups, "
        "count(DISTINCT winner_image_id)::BIGINT AS n_winner_images FROM pairs_out GROUP BY user_id ORDER BY user_id",
    )
    lap("user_pairs")

    # the naive rule's pairs: the yield the card and the metadata compare against (cheap: images only)
    base_table = _naive_pairs(con, raw)
    lap("baseline")

    raw_by_image = dict(zip(raw.column("image_id").to_pylist(), raw.column("events_accepted").to_pylist()))
    image_table = pa.table(
        {
            "image_id": images.column("image_id"),
            "uid": images.column("uid"),
            "path": images.column("path"),
            "prompt_group": images.column("prompt_group"),
            "prompt_key": images.column("prompt_key"),
            "creator_id": images.column("creator_id"),
            "events_accepted": pa.array([raw_by_image.get(i, 0) for i in image_ids], pa.int64()),
            "exposed": exposed.astype(np.int64),
            "impressions": impressions.astype(np.int64),
            "expected": expected,
            "score": score,
            **{f"n_{e}": raw_events[e].astype(np.int64) for e in POSITIVE_EVENTS},
            "post_shape": a_post,
            "post_rate": b_post,
            "post_mean": post_mean,
            "group_rank": group_rank,
        }
    )
    con.close()

    user_est = estimated_precision(user_support)
    reasons: dict[str, int] = {}
    for r_ in all_rejects.column("reason").to_pylist():
        reasons[r_] = reasons.get(r_, 0) + 1
    n_cand = len(ia)
    rules = bots.column("rule").to_pylist()
    stats = {
        "image_rows_in": imgs.rows_in,
        "images_accepted": n_img,
        "images_rejected": imgs.rows_in - n_img,
        "reposts_folded": imgs.copies.num_rows,  # copies (same bytes) whose events count for the original
        "events_in": int(n_accepted + ev_rejects.num_rows + n_file_rejects),
        "events_accepted": n_accepted,
        "events_rejected": int(ev_rejects.num_rows + n_file_rejects),
        "events_self_excluded": int(n_self or 0) if cfg.exclude_self else 0,
        "events_bot_excluded": n_bot_events,
        "rejects_by_reason": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "bots_flagged": bots.num_rows,
        "bots_by_rule": {
            k: sum(1 for r_ in rules if k in r_.split("+")) for k in ("rate", "ring", "booster")
        },
        "users_active": activity.num_rows,
        "strata": strata,
        "stratum_base_rates": {s: float(b) for s, b in zip(strata, base_s)},
        "exposure_model": "gamma-poisson, offsets = exposures per stratum x stratum base rate",
        "prior": {
            "alpha": prior.alpha,
            "beta": prior.beta,
            "mean": prior.mean,
            "images": prior.n_images,
        },
        "fdr_level": cfg.fdr_level,
        "min_ratio": cfg.min_ratio,
        "min_prob": cfg.min_prob,
        # the posterior's own estimates over the emitted pairs: wrong way round / below min_ratio
        "expected_wrong_pairs": float(np.sum(1.0 - pwin)),
        "expected_fdr": float(np.mean(1.0 - pmargin)) if n_pop else None,
        # split-half calibration (pipeline/social/calibrate.py): the log's dispersion and the
        # population pairs' estimated precision (right order), with its 95% interval
        "calibration": None if dispersion is None else dispersion.to_dict(),
        "test": (
            f"taste-balanced: {n_cells} taste cells, mean posterior log engagement"
            if cfg.taste_axes > 0
            else "pooled gamma-poisson"
        ),
        "taste_singular_values": [float(x) for x in singular],
        "estimated_precision": precision_est["precision"],
        "estimated_precision_interval": precision_est["interval"],
        "naive_pairs": base_table.num_rows,
        "yield_vs_naive": n_pop / base_table.num_rows if base_table.num_rows else None,
        "prompt_groups": len(g_codes),
        "image_pairs_total": int(_comb2(m_g).sum()),
        "pairs_dropped_low_exposure": int((_comb2(m_g) - _comb2(x_g)).sum()),
        "pairs_dropped_group_overflow": int((_comb2(x_g) - _comb2(y_g)).sum()),
        "pairs_tested": n_cand,
        "pairs_dropped_tie": int(tie.sum()),
        "pairs_dropped_weak": int(weak.sum()),
        "population_pairs": n_pop,
        "user_pairs": user_pairs.num_rows,
        "user_pairs_dropped_unsupported": n_user_unsupported,
        "user_estimated_precision": user_est["precision"],
        "user_estimated_precision_interval": user_est["interval"],
        "user_pair_sessions": n_user_sessions_pairs,
        "users_with_pairs": users.num_rows,
        "baseline_pairs": base_table.num_rows,
    }
    stats["empty_because"] = empty_reason(stats, cfg)
    if stats["events_in"] != n_read + n_file_rejects:
        raise RuntimeError(
            f"events lost inside the builder: {n_read} rows read, {n_accepted} accepted + "
            f"{ev_rejects.num_rows} rejected"
        )
    result = SocialResult(
        pairs, users, image_table, all_rejects, stats, prior, base_table if baseline else None, bots
    )
    if out_dir is not None:
        stats["dataset_version"] = version
        _write_outputs(result, images, Path(out_dir), cfg, lap)
    stats["timings_s"] = timings | {"total": round(time.perf_counter() - t_all, 4)}
    if out_dir is not None:
        write_bytes_atomic(
            json.dumps(stats, indent=2, sort_keys=True, default=str).encode(),
            Path(out_dir) / "social_stats.json",
        )
    return result


def _bot_table(activity: pa.Table, rings: pa.Table, boosters: pa.Table) -> pa.Table:
    """One row per flagged account: user_id, rule ('rate', 'ring', 'booster', or several joined
    by '+'), detail (what fired)."""
    found: dict[str, dict[str, str]] = {}
    act = activity.filter(pc.field("is_bot")).to_pylist()
    for r in act:
        found.setdefault(r["user_id"], {})["rate"] = (
            f"{r['events_per_day']:.0f} events/day, {r['positive_ratio']:.2f} positive/impression"
        )
    for r in rings.to_pylist():
        found.setdefault(r["user_id"], {})["ring"] = (
            f"mutual remixes with {r['ring_partners']}: {r['partners']}"
        )
    for r in boosters.to_pylist():
        d = found.setdefault(r["user_id"], {})
        txt = (
            f"engaged with {r['engaged_images']}/{r['seen_images']} images of {r['boosted_creator']} "
            f"(chance <= {r['tail']:.1e} at an expected rate of {r['expected_rate']:.3f}; "
            f"{r['group_members']} suspects of this creator)"
        )
        d["booster"] = d["booster"] + "; " + txt if "booster" in d else txt
    users = sorted(found)
    order = ("rate", "ring", "booster")
    return pa.table(
        {
            "user_id": pa.array(users, pa.string()),
            "rule": pa.array(["+".join(k for k in order if k in found[u]) for u in users], pa.string()),
            "detail": pa.array(
                ["; ".join(found[u][k] for k in order if k in found[u]) for u in users], pa.string()
            ),
        }
    )


def _captions(groups: list[str], prompts: list[str]):
    """caption(i, j): the prompt images i and j both answer. Their own text when it is the same
    (whitespace tidied); otherwise (same prompt_id or same normalised text, different spelling)
    the group's most common spelling, ties to the one not in capitals, then the first by text."""
    tidy = [" ".join(p.split()) for p in prompts]
    counts: dict[str, dict[str, int]] = {}
    for g, t in zip(groups, tidy):
        counts.setdefault(g, {}).setdefault(t, 0)
        counts[g][t] += 1
    canonical = {
        g: min(c.items(), key=lambda kv: (-kv[1], kv[0] == kv[0].upper(), kv[0]))[0]
        for g, c in counts.items()
    }

    def caption(i: int, j: int) -> str:
        return tidy[i] if tidy[i] == tidy[j] else canonical[groups[i]]

    return caption


def _q(con, query: str, params: dict | None = None) -> pa.Table:
    """A query's result as a pyarrow Table (DuckDB 1.x and 2.x spellings)."""
    rel = con.sql(query, params=params) if params else con.sql(query)
    for name in ("to_arrow_table", "arrow"):
        fn = getattr(rel, name, None)
        if fn is not None:
            t = fn()
            return t.read_all() if hasattr(t, "read_all") else t
    raise AttributeError("this DuckDB relation has no Arrow export")


def _naive_pairs(con, raw: pa.Table) -> pa.Table:
    """Naive rule: within a prompt group, the image with more raw remixes wins; equal remixes: more
    raw likes wins; equal both: dropped. Raw counts over all accepted events (raw: the
    social_image_raw_counts table)."""
    con.register("raw_counts", raw)
    return _q(
        con,
        """
            WITH c AS (
                SELECT i.image_id, i.prompt_group, coalesce(r.raw_remixes, 0) AS rm, coalesce(r.raw_likes, 0) AS lk
                FROM images_ok i LEFT JOIN raw_counts r USING (image_id)
            )
            SELECT a.prompt_group,
                   CASE WHEN (a.rm, a.lk) > (b.rm, b.lk) THEN a.image_id ELSE b.image_id END AS winner_image_id,
                   CASE WHEN (a.rm, a.lk) > (b.rm, b.lk) THEN b.image_id ELSE a.image_id END AS loser_image_id
            FROM c a JOIN c b ON a.prompt_group = b.prompt_group AND a.image_id < b.image_id
            WHERE (a.rm, a.lk) <> (b.rm, b.lk)
            ORDER BY 1, 2, 3
            """,
    )


def _write_outputs(result: SocialResult, images: pa.Table, out_dir: Path, cfg: SocialConfig, lap) -> None:
    from pipeline.social.export import ImageBytes, write_pickapic, write_webdataset

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "social_pairs": write_parquet_atomic(result.pairs, out_dir / "social_pairs.parquet"),
        "social_users": write_parquet_atomic(result.users, out_dir / "social_users.parquet"),
        "social_images": write_parquet_atomic(result.images, out_dir / "social_images.parquet"),
        "social_rejects": write_parquet_atomic(result.rejects, out_dir / "social_rejects.parquet"),
    }
    if result.bots is not None:
        paths["social_bots"] = write_parquet_atomic(result.bots, out_dir / "social_bots.parquet")
    lap("write_tables")
    image_bytes = ImageBytes(  # one image cache for the four exports: each file read about once
        dict(
            zip(
                images.column("image_id").to_pylist(),
                zip(images.column("path").to_pylist(), images.column("model").to_pylist()),
            )
        )
    )
    kind = result.pairs.column("kind")
    population = result.pairs.filter(pc.equal(kind, "population"))
    per_user = result.pairs.filter(pc.equal(kind, "user"))
    if cfg.export_webdataset:
        paths["webdataset"] = write_webdataset(population, image_bytes, out_dir / "webdataset", cfg, result.stats)
        paths["per_user_webdataset"] = write_webdataset(
            per_user, image_bytes, out_dir / "per_user" / "webdataset", cfg, result.stats
        )
        lap("export_webdataset")
    if cfg.export_pickapic:
        paths["pickapic"] = write_pickapic(population, image_bytes, out_dir / "pickapic", cfg)
        paths["per_user_pickapic"] = write_pickapic(per_user, image_bytes, out_dir / "per_user" / "pickapic", cfg)
        lap("export_pickapic")
    result.paths = {k: str(v) for k, v in paths.items()}
