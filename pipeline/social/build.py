"""build_social_pairs: interaction logs -> population and per-user preference pairs (+ exports)."""

from __future__ import annotations

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
from pipeline.social.bayes import BetaPrior, fit_beta_prior, posterior, prob_greater
from pipeline.social.config import POSITIVE_EVENTS, SocialConfig
from pipeline.social.ingest import find_inputs, load_images, load_sql, register_events
from pipeline.storage import write_bytes_atomic, write_parquet_atomic

STAGE = "social"

PAIR_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("kind", pa.string()),  # "population" | "user"
        ("user_id", pa.string()),  # null for population pairs
        ("prompt", pa.string()),
        ("prompt_group", pa.string()),
        ("winner_image_id", pa.string()),
        ("loser_image_id", pa.string()),
        ("winner_uid", pa.string()),
        ("loser_uid", pa.string()),
        ("prob", pa.float64()),  # posterior P(rate_winner > rate_loser); null for user pairs
        ("winner_exposure", pa.float64()),  # effective (stratum-standardised) exposures; user: impressions
        ("loser_exposure", pa.float64()),
        ("winner_impressions", pa.int64()),  # exposed users (population) / impressions by the user
        ("loser_impressions", pa.int64()),
        ("winner_score", pa.float64()),  # weighted engagement (population) / the user's score
        ("loser_score", pa.float64()),
        ("winner_rate", pa.float64()),  # posterior mean engagement per exposure (population)
        ("loser_rate", pa.float64()),
    ]
)


@dataclass
class SocialResult:
    pairs: pa.Table  # PAIR_SCHEMA, population pairs then user pairs
    users: pa.Table  # user_id, n_pairs, n_groups, n_winner_images
    images: pa.Table  # per accepted image: exposures, score, posterior
    rejects: pa.Table  # REJECT_SCHEMA, stage "social"
    stats: dict
    prior: BetaPrior | None = None
    baseline: pa.Table | None = None  # naive-rule pairs when asked for
    paths: dict = field(default_factory=dict)


def _comb2(x):
    x = np.asarray(x, dtype=np.int64)
    return x * (x - 1) // 2


def _pair_ids(kind: str, users, winners, losers) -> list[str]:
    return [stable_key("social", kind, u or "", w, l) for u, w, l in zip(users, winners, losers)]


def build_social_pairs(
    social_dir: Path,
    out_dir: Path | None = None,
    config: SocialConfig | None = None,
    *,
    partition: str = "",
    baseline: bool = False,
    threads: int | None = None,
) -> SocialResult:
    """Read the social input folder, write social_pairs / social_users / social_images /
    social_rejects Parquet tables, WebDataset shards and a Pick-a-Pic Parquet export under out_dir
    (nothing is written when out_dir is None), and return the tables and stats.

    baseline=True also computes the naive rule's pairs (raw remix, then like counts; no exposure
    normalisation, no test, bots and creators included) over the same accepted events."""
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
    imgs = load_images(social_dir, image_files, rejects, cfg.window_days)
    images = imgs.table.sort_by("image_id")
    lap("images")

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    con.register("images_ok", images.select(["image_id", "prompt_group", "creator_id", "created_at"]))
    con.register("images_rejected", pa.table({"image_id": pa.array(imgs.rejected_ids, pa.string())}))
    register_events(con, social_dir, event_files, cfg.stratum_column)
    con.execute("CREATE TEMP TABLE dup_rows AS " + load_sql("social_duplicate_events"))
    con.execute("CREATE TEMP VIEW ev_classified AS " + load_sql("social_events_classified"))
    lap("classify_events")

    ev_rejects = _q(con, load_sql("social_event_rejects"))
    n_in = con.sql("SELECT count(*) FROM events_src").fetchall()[0][0]
    n_rej = ev_rejects.num_rows
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
    all_rejects = pa.concat_tables([rejects.to_table(), ev_rej_table])
    lap("rejects")

    activity = _q(
        con,
        load_sql("social_user_activity"),
        {
            "min_events": cfg.bot_min_events,
            "max_per_day": cfg.bot_max_events_per_day,
            "max_positive_ratio": cfg.bot_max_positive_ratio,
        },
    )
    bots = activity.filter(pc.field("is_bot")).select(["user_id"])
    con.register("bots", bots)
    n_bot_events = int(pc.sum(activity.filter(pc.field("is_bot")).column("n_events")).as_py() or 0)
    n_self = int(pc.sum(activity.column("n_self_events")).as_py() or 0)
    lap("bots")

    con.execute(
        "CREATE TEMP TABLE user_image AS " + load_sql("social_user_image"), {"exclude_self": cfg.exclude_self}
    )
    counts = _q(con, load_sql("social_image_stratum_counts"), {"dedupe": cfg.dedupe_per_user})
    lap("aggregate")

    # --- per-image exposure-standardised engagement (numpy, deterministic order) ----------------
    image_ids = images.column("image_id").to_pylist()
    index = {iid: i for i, iid in enumerate(image_ids)}
    strata = sorted(set(counts.column("stratum").to_pylist()))
    s_index = {s: j for j, s in enumerate(strata)}
    n_img, n_str = len(image_ids), max(len(strata), 1)
    rows = np.array([index[x] for x in counts.column("image_id").to_pylist()], dtype=np.int64)
    cols = np.array([s_index[x] for x in counts.column("stratum").to_pylist()], dtype=np.int64)
    N = np.zeros((n_img, n_str))
    K = np.zeros((n_img, n_str))
    np.add.at(N, (rows, cols), counts.column("n_exposed").to_numpy().astype(np.float64))
    raw_events = {}
    for e in POSITIVE_EVENTS:
        c = np.zeros((n_img, n_str))
        np.add.at(c, (rows, cols), counts.column(f"n_{e}").to_numpy().astype(np.float64))
        raw_events[e] = c.sum(axis=1)
        K += cfg.weights.get(e, 0.0) * c
    if cfg.dedupe_per_user:
        # a user's contribution per image and stratum is sum_e w_e x_e <= sum_e w_e; scaled to [0, 1]
        # the score of one exposure is a [0, 1] variable, whose variance is at most p(1-p): the
        # binomial model below is then conservative, not overconfident
        K /= max(sum(cfg.weights.get(e, 0.0) for e in POSITIVE_EVENTS), 1e-12)
    tot_n, tot_k = N.sum(), K.sum()
    base_all = tot_k / tot_n if tot_n > 0 else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        base_s = np.where(N.sum(axis=0) > 0, K.sum(axis=0) / N.sum(axis=0), base_all)
    if base_all > 0:
        n_eff = (N * base_s[None, :]).sum(axis=1) / base_all
    else:
        n_eff = N.sum(axis=1)
    k_img = np.minimum(K.sum(axis=1), n_eff)
    prior = fit_beta_prior(k_img, n_eff, min_trials=cfg.min_exposure)
    a_post, b_post = posterior(prior, k_img, n_eff)
    post_mean = a_post / (a_post + b_post)
    lap("prior")

    groups = images.column("prompt_group").to_pylist()
    order = sorted(range(n_img), key=lambda i: (groups[i], -n_eff[i], image_ids[i]))
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
            "n_eff": n_eff,
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
    p = prob_greater(a_post[ia], b_post[ia], a_post[ib], b_post[ib], cfg.prob_method)
    a_wins = p >= cfg.level
    b_wins = p <= 1 - cfg.level
    emit = a_wins | b_wins
    dropped = ~emit
    tie = dropped & (np.abs(post_mean[ia] - post_mean[ib]) < cfg.tie_margin * prior.mean)
    weak = dropped & ~tie
    win = np.where(a_wins, ia, ib)[emit]
    lose = np.where(a_wins, ib, ia)[emit]
    pwin = np.where(a_wins, p, 1 - p)[emit]

    # pair accounting per group: all pairs = low exposure + overflow + candidates
    g_codes = {g: j for j, g in enumerate(sorted(set(groups)))}
    gi = np.array([g_codes[g] for g in groups], dtype=np.int64)
    m_g = np.bincount(gi, minlength=len(g_codes))
    x_g = np.bincount(gi, weights=(n_eff >= cfg.min_exposure), minlength=len(g_codes)).astype(np.int64)
    y_g = np.minimum(x_g, cfg.max_images_per_group)
    lap("test")

    uids = images.column("uid").to_pylist()
    prompts_by_group: dict[str, str] = {}
    for g, pr in zip(groups, images.column("prompt").to_pylist()):
        prompts_by_group.setdefault(g, " ".join(pr.split()))  # the first image's prompt, whitespace tidied
    win_ids = [image_ids[i] for i in win]
    lose_ids = [image_ids[i] for i in lose]
    n_pop = len(win_ids)
    raw_exposed = N.sum(axis=1)
    pop = pa.table(
        {
            "pair_id": _pair_ids("population", [None] * n_pop, win_ids, lose_ids),
            "kind": ["population"] * n_pop,
            "user_id": pa.nulls(n_pop, pa.string()),
            "prompt": [prompts_by_group[groups[i]] for i in win],
            "prompt_group": [groups[i] for i in win],
            "winner_image_id": win_ids,
            "loser_image_id": lose_ids,
            "winner_uid": [uids[i] for i in win],
            "loser_uid": [uids[i] for i in lose],
            "prob": pwin,
            "winner_exposure": n_eff[win],
            "loser_exposure": n_eff[lose],
            "winner_impressions": raw_exposed[win].astype(np.int64),
            "loser_impressions": raw_exposed[lose].astype(np.int64),
            "winner_score": K.sum(axis=1)[win],
            "loser_score": K.sum(axis=1)[lose],
            "winner_rate": post_mean[win],
            "loser_rate": post_mean[lose],
        },
        schema=PAIR_SCHEMA,
    )

    # --- per-user pairs ----------------------------------------------------------------------------
    user_pairs = PAIR_SCHEMA.empty_table()
    if cfg.user_pairs:
        w = cfg.weights
        up = _q(
            con,
            load_sql("social_user_pairs"),
            {f"w_{e}": float(w.get(e, 0.0)) for e in POSITIVE_EVENTS}
            | {"min_score": cfg.user_min_score, "max_per_group": cfg.max_user_pairs_per_group},
        )
        m = up.num_rows
        wi = [index[x] for x in up.column("winner_image_id").to_pylist()]
        li = [index[x] for x in up.column("loser_image_id").to_pylist()]
        users_col = up.column("user_id").to_pylist()
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
                "prompt": [prompts_by_group[groups[i]] for i in wi],
                "prompt_group": up.column("prompt_group"),
                "winner_image_id": up.column("winner_image_id"),
                "loser_image_id": up.column("loser_image_id"),
                "winner_uid": [uids[i] for i in wi],
                "loser_uid": [uids[i] for i in li],
                "prob": pa.nulls(m, pa.float64()),
                "winner_exposure": pc.cast(up.column("winner_impressions"), pa.float64()),
                "loser_exposure": pc.cast(up.column("loser_impressions"), pa.float64()),
                "winner_impressions": pc.cast(up.column("winner_impressions"), pa.int64()),
                "loser_impressions": pc.cast(up.column("loser_impressions"), pa.int64()),
                "winner_score": pc.cast(up.column("winner_score"), pa.float64()),
                "loser_score": pa.array(np.zeros(m)),
                "winner_rate": pa.nulls(m, pa.float64()),
                "loser_rate": pa.nulls(m, pa.float64()),
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

    base_table = None
    if baseline:
        base_table = _naive_pairs(con, images, cand_all=True)
        lap("baseline")

    image_table = pa.table(
        {
            "image_id": images.column("image_id"),
            "uid": images.column("uid"),
            "path": images.column("path"),
            "prompt_group": images.column("prompt_group"),
            "prompt_key": images.column("prompt_key"),
            "creator_id": images.column("creator_id"),
            "exposed": raw_exposed.astype(np.int64),
            "n_eff": n_eff,
            "score": K.sum(axis=1),
            **{f"n_{e}": raw_events[e].astype(np.int64) for e in POSITIVE_EVENTS},
            "post_alpha": a_post,
            "post_beta": b_post,
            "post_mean": post_mean,
            "group_rank": group_rank,
        }
    )
    con.close()

    reasons: dict[str, int] = {}
    for r_ in all_rejects.column("reason").to_pylist():
        reasons[r_] = reasons.get(r_, 0) + 1
    n_cand = len(ia)
    stats = {
        "image_rows_in": imgs.rows_in,
        "images_accepted": n_img,
        "images_rejected": imgs.rows_in - n_img,
        "events_in": int(n_in),
        "events_accepted": int(n_in - n_rej),
        "events_rejected": int(n_rej),
        "events_self_excluded": int(n_self or 0) if cfg.exclude_self else 0,
        "events_bot_excluded": n_bot_events,
        "rejects_by_reason": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "bots_flagged": bots.num_rows,
        "users_active": activity.num_rows,
        "strata": strata,
        "stratum_base_rates": {s: float(b) for s, b in zip(strata, base_s)},
        "prior": {"alpha": prior.alpha, "beta": prior.beta, "mean": prior.mean, "images": prior.n_images},
        "prompt_groups": len(g_codes),
        "image_pairs_total": int(_comb2(m_g).sum()),
        "pairs_dropped_low_exposure": int((_comb2(m_g) - _comb2(x_g)).sum()),
        "pairs_dropped_group_overflow": int((_comb2(x_g) - _comb2(y_g)).sum()),
        "pairs_tested": n_cand,
        "pairs_dropped_tie": int(tie.sum()),
        "pairs_dropped_weak": int(weak.sum()),
        "population_pairs": n_pop,
        "user_pairs": user_pairs.num_rows,
        "users_with_pairs": users.num_rows,
        "baseline_pairs": None if base_table is None else base_table.num_rows,
    }
    assert stats["events_in"] == stats["events_accepted"] + stats["events_rejected"]
    result = SocialResult(pairs, users, image_table, all_rejects, stats, prior, base_table)
    if out_dir is not None:
        _write_outputs(result, images, Path(out_dir), cfg, lap)
    stats["timings_s"] = timings | {"total": round(time.perf_counter() - t_all, 4)}
    if out_dir is not None:
        write_bytes_atomic(
            json.dumps(stats, indent=2, sort_keys=True, default=str).encode(),
            Path(out_dir) / "social_stats.json",
        )
    return result


def _q(con, query: str, params: dict | None = None) -> pa.Table:
    """A query's result as a pyarrow Table (DuckDB 1.x and 2.x spellings)."""
    rel = con.sql(query, params=params) if params else con.sql(query)
    for name in ("to_arrow_table", "arrow"):
        fn = getattr(rel, name, None)
        if fn is not None:
            t = fn()
            return t.read_all() if hasattr(t, "read_all") else t
    raise AttributeError("this DuckDB relation has no Arrow export")


def _naive_pairs(con, images: pa.Table, cand_all: bool = True) -> pa.Table:
    """Naive rule: within a prompt group, the image with more raw remixes wins; equal remixes: more
    raw likes wins; equal both: dropped. Raw counts over all accepted events."""
    raw = _q(con, load_sql("social_image_raw_counts"))
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
    from pipeline.social.export import write_pickapic, write_webdataset

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "social_pairs": write_parquet_atomic(result.pairs, out_dir / "social_pairs.parquet"),
        "social_users": write_parquet_atomic(result.users, out_dir / "social_users.parquet"),
        "social_images": write_parquet_atomic(result.images, out_dir / "social_images.parquet"),
        "social_rejects": write_parquet_atomic(result.rejects, out_dir / "social_rejects.parquet"),
    }
    lap("write_tables")
    path_of = dict(
        zip(
            images.column("image_id").to_pylist(),
            zip(images.column("path").to_pylist(), images.column("model").to_pylist()),
        )
    )
    if cfg.export_webdataset:
        paths["webdataset"] = write_webdataset(
            result.pairs, path_of, out_dir / "webdataset", cfg, result.stats
        )
        lap("export_webdataset")
    if cfg.export_pickapic:
        paths["pickapic"] = write_pickapic(result.pairs, path_of, out_dir / "pickapic", cfg)
        lap("export_pickapic")
    result.paths = {k: str(v) for k, v in paths.items()}
