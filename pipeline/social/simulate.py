"""A simulated image-sharing community whose ground truth is known.

Every image has a latent quality q and a 2-d style vector f; every user has a taste vector t; the
utility of image i for user u is q_i + t_u . f_i. Population ground truth is q (E[t] = 0); per-user
ground truth is the utility. What the simulator writes follows the social input contract
(pipeline/social/__init__.py): images.parquet + small deterministic JPEGs under files/, and
events-YYYY-MM-DD.parquet day partitions. The ground truth goes to a separate folder.

The log has the confounds the builder must undo:
- heavy-tailed exposure: creators' follower counts are Pareto, every image gets a log-normal
  exposure factor, and a few "featured" images get `featured_boost` times more impressions;
- audience/position bias: impressions on the "following" surface (followers of the creator) and on
  the "featured" slot engage more at equal quality (logit +0.8 / +0.3);
- self-engagement: creators like/save/share/remix their own images;
- a bot farm: fast bots (> 1000 events a day, with cover traffic) and slow bots (mostly
  positive events) that push a set of low-quality target images;
- remix rings: groups of accounts with human-like volumes that create low-quality images and
  click, like and remix every image the other members post;
- boosters: accounts with human-like volumes and positive ratios (cover traffic on random
  images) that also like, and sometimes save or remix, nearly every image of one creator;
- time decay: impressions of an image fall off exponentially after it is created;
- prompt pages: part of the organic traffic is a user opening one prompt's page and seeing several
  of its images together, a few seconds apart (surface "prompt"); the rest is a feed of single
  images. Per-user pairs are meant to come from images shown together like this;
- all six events, as a funnel: impression -> click -> like -> save/share, click -> remix.

The truth folder says which accounts are bots and of what kind (users_truth.bot_kind: fast, slow,
ring, booster; null for people), which images each kind pushed, and each image's quality.

Everything is vectorised numpy and written straight to Parquet (10 M events in well under a
minute on 2 cores); the same SimConfig gives byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.decode import encode_jpeg

DAY_S = 86_400
_ADJ = [
    "red",
    "quiet",
    "golden",
    "misty",
    "neon",
    "ancient",
    "tiny",
    "giant",
    "frozen",
    "velvet",
    "rusty",
    "lucky",
    "hollow",
    "silver",
    "wild",
    "paper",
]
_NOUN = [
    "fox",
    "lighthouse",
    "robot",
    "castle",
    "garden",
    "dragon",
    "city",
    "cat",
    "ship",
    "forest",
    "teapot",
    "violin",
    "mountain",
    "owl",
    "bridge",
    "astronaut",
]
_STYLE = ["oil painting", "watercolor", "photo", "pixel art", "ink sketch", "3d render", "anime", "collage"]


@dataclass(frozen=True)
class SimConfig:
    n_events: int = 200_000  # organic + bot + self events (bad rows come on top)
    n_prompts: int | None = None  # default: n_events // 4000, at least 20
    images_per_prompt: tuple[int, int] = (4, 10)
    n_users: int | None = None  # default: n_events // 200, at least 300
    creator_frac: float = 0.1  # share of users who create images
    n_days: int = 14
    start: str = "2026-11-01"
    featured_frac: float = 0.03
    featured_boost: float = 15.0
    n_bots: int | None = None  # default: n_users // 1000, at least 2 (a fast bot makes ~28k events)
    bot_targets: int = 30
    n_rings: int | None = None  # remix rings; default: n_users // 5000, at least 1 (0: none)
    ring_size: tuple[int, int] = (5, 9)  # accounts per ring (inclusive range)
    ring_images: tuple[int, int] = (2, 4)  # images each ring account posts
    n_boosted: int | None = None  # creators with boosters; default: n_users // 5000, at least 1 (0: none)
    boosters_per_creator: tuple[int, int] = (4, 10)
    boosted_images: tuple[int, int] = (3, 6)  # low-quality images a boosted creator posts
    booster_coverage: float = 0.9  # share of the boosted creator's images each booster engages with
    boost_popular: bool = False  # boosted creators drawn from the most followed tenth (else any creator)
    cover_impressions_per_day: tuple[float, float] = (15.0, 60.0)  # ring/booster cover traffic
    cover_like_rate: float = 0.08  # likes per cover impression (people: about 0.02-0.1)
    gallery_frac: float = 0.3  # share of organic impressions seen on a prompt page (2-6 images)
    gallery_size: tuple[int, int] = (2, 6)
    self_engage_frac: float = 0.5  # share of images their creator engages with
    taste_sd: float = 0.6
    # exposure confounding: how much more the following / featured surfaces engage at equal
    # quality (logit +0.8 / +0.3 times this)
    surface_bias: float = 1.0
    with_prompt_id: bool = True
    image_size: int = 64
    inject_bad: int = 0  # bad rows per reject reason (events and images); 0: a clean log
    seed: int = 0


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _ids(prefix: str, n: int, width: int) -> list[str]:
    return [f"{prefix}{i:0{width}d}" for i in range(n)]


def _dict_array(indices: np.ndarray, values: list[str]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(indices.astype(np.int32)), pa.array(values, pa.string()))


def _jpeg(rng: np.random.Generator, size: int) -> bytes:
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, size)[None, :, None]
    img = (c0 * (1 - t) + c1 * t).repeat(size, axis=0)
    x0, y0 = rng.integers(0, size // 2, 2)
    w, h = rng.integers(size // 8, size // 2, 2)
    img[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 256, 3)
    return encode_jpeg(img, quality=85)


def _vary_prompt(text: str, r: int) -> str:
    """Surface variants of one prompt that the normaliser must group together."""
    if r == 1:
        return text.capitalize() + "."
    if r == 2:
        return text.upper().replace(" ", "  ")
    if r == 3:
        return "  " + text.replace(",", " ,") + "!"
    return text


def simulate(out_dir: Path, truth_dir: Path | None = None, config: SimConfig = SimConfig()) -> dict:
    """Write a simulated social log to out_dir (the input contract) and its truth to truth_dir
    (default out_dir/../truth). Returns a summary (counts, paths)."""
    cfg = config
    out_dir = Path(out_dir)
    truth_dir = Path(truth_dir) if truth_dir is not None else out_dir.parent / (out_dir.name + "_truth")
    (out_dir / "files").mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)

    n_prompts = cfg.n_prompts or max(20, cfg.n_events // 4000)
    n_users = cfg.n_users or max(300, cfg.n_events // 200)
    n_creators = max(5, int(n_users * cfg.creator_frac))
    n_bots = cfg.n_bots if cfg.n_bots is not None else max(2, n_users // 1000)
    lo, hi = cfg.images_per_prompt
    per_prompt = rng.integers(lo, hi + 1, n_prompts)
    n_images = int(per_prompt.sum())
    img_prompt = np.repeat(np.arange(n_prompts), per_prompt)
    t0 = np.datetime64(cfg.start, "s").astype(np.int64)
    t_end = t0 + cfg.n_days * DAY_S

    # --- accounts: people [0, n_users), then farm bots, ring accounts, boosters ----------------
    n_rings = cfg.n_rings if cfg.n_rings is not None else max(1, n_users // 5000)
    ring_sizes = rng.integers(cfg.ring_size[0], cfg.ring_size[1] + 1, n_rings)
    n_boosted = cfg.n_boosted if cfg.n_boosted is not None else max(1, n_users // 5000)
    booster_counts = rng.integers(cfg.boosters_per_creator[0], cfg.boosters_per_creator[1] + 1, n_boosted)
    first_ring = n_users + n_bots
    first_booster = first_ring + int(ring_sizes.sum())
    n_all_users = first_booster + int(booster_counts.sum())
    bot_kind = np.array([None] * n_all_users, dtype=object)
    bot_kind[n_users:first_ring] = ["fast" if j % 2 == 0 else "slow" for j in range(n_bots)]
    bot_kind[first_ring:first_booster] = "ring"
    bot_kind[first_booster:] = "booster"
    user_ids = _ids("u", n_all_users, 7)
    taste = rng.normal(0.0, cfg.taste_sd, (n_all_users, 2))
    activity = rng.lognormal(0.0, 1.0, n_users)
    followers = np.minimum((rng.pareto(1.1, n_creators) + 1) * 20, n_users / 2)
    creator_w = rng.pareto(1.5, n_creators) + 1  # a few prolific creators

    # --- images ---------------------------------------------------------------------------------
    quality = rng.normal(0.0, 1.0, n_images)
    style = rng.normal(0.0, 1.0, (n_images, 2))
    creator = rng.choice(n_creators, n_images, p=creator_w / creator_w.sum())  # a user index
    img_followers = followers[creator]
    featured = rng.random(n_images) < cfg.featured_frac
    created = t0 + (rng.random(n_images) * 0.7 * cfg.n_days * DAY_S).astype(np.int64)
    pushed_by = np.array([None] * n_images, dtype=object)
    # ring accounts post low-quality images (taken over from their drawn creators)
    low = np.flatnonzero(quality < -0.3)
    rng.shuffle(low)
    rings: list[np.ndarray] = []
    taken = 0
    for r_i, size in enumerate(ring_sizes):
        members = first_ring + int(ring_sizes[:r_i].sum()) + np.arange(size)
        rings.append(members)
        for m in members:
            k = int(rng.integers(cfg.ring_images[0], cfg.ring_images[1] + 1))
            own = low[taken : taken + k]
            taken += own.size
            creator[own] = m
            img_followers[own] = 20.0
            pushed_by[own] = "ring"
    # boosted creators: people who post a few low-quality images (plus whatever else they drew)
    if cfg.boost_popular:  # boosters of creators everyone already likes: the most followed decile
        top = np.argsort(-followers, kind="stable")[: max(min(n_boosted, n_creators), n_creators // 10)]
        boosted = [int(c) for c in rng.choice(top, min(n_boosted, top.size), replace=False)]
    else:
        boosted = [int(c) for c in rng.choice(n_creators, min(n_boosted, n_creators), replace=False)]
    for c in boosted:
        k = int(rng.integers(cfg.boosted_images[0], cfg.boosted_images[1] + 1))
        own = low[taken : taken + k]
        taken += own.size
        creator[own] = c
        img_followers[own] = followers[c]
    low = low[taken:]
    exposure = np.sqrt(img_followers / followers.mean()) * rng.lognormal(0.0, 0.8, n_images)
    exposure *= np.where(featured, cfg.featured_boost, 1.0)
    exposure *= (t_end - created) / (cfg.n_days * DAY_S)  # older images had longer to collect views
    image_ids = _ids("i", n_images, 7)

    base_prompts = [
        f"{_ADJ[rng.integers(len(_ADJ))]} {_NOUN[rng.integers(len(_NOUN))]} number {p}, {_STYLE[rng.integers(len(_STYLE))]}"
        for p in range(n_prompts)
    ]
    variants = rng.integers(0, 4, n_images)
    prompts = [_vary_prompt(base_prompts[img_prompt[i]], int(variants[i])) for i in range(n_images)]
    paths = [f"files/{iid}.jpg" for iid in image_ids]
    for i, p in enumerate(paths):
        (out_dir / p).write_bytes(_jpeg(np.random.default_rng([cfg.seed, i]), cfg.image_size))

    # --- bots and self-engagement (fixed budgets, the rest is organic) --------------------------
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("ts", "user", "image", "event", "surface")}

    def emit(ts, user, image, event, surface):
        ts = np.asarray(ts, np.int64)
        cols["ts"].append(ts)
        cols["user"].append(np.broadcast_to(np.asarray(user, np.int64), ts.shape))
        cols["image"].append(np.asarray(image, np.int64))
        cols["event"].append(np.broadcast_to(np.asarray(event, np.int8), ts.shape))
        cols["surface"].append(np.broadcast_to(np.asarray(surface, np.int8), ts.shape))

    # events: 0 impression 1 click 2 like 3 save 4 share 5 remix;
    # surfaces: 0 explore 1 following 2 featured 3 prompt (a prompt's page, several images together)
    targets = (
        rng.choice(low, min(cfg.bot_targets, low.size), replace=False) if low.size else np.array([], int)
    )
    pushed_by[targets] = "farm"
    for b_i, b in enumerate(range(n_users, first_ring)):
        fast = b_i % 2 == 0
        for d in range(cfg.n_days):
            day0 = t0 + d * DAY_S
            tg = targets[created[targets] < day0 + DAY_S]
            if tg.size:
                ts = np.maximum(day0 + rng.integers(0, DAY_S, tg.size), created[tg] + 1)
                for ev in (0, 2, 5):
                    emit(ts + ev, b, tg, ev, 0)
            if fast:  # cover traffic: many random impressions and some likes
                m = 2000
                im = rng.integers(0, n_images, m)
                ok = created[im] < day0 + DAY_S
                im = im[ok]
                ts = np.maximum(day0 + rng.integers(0, DAY_S, im.size), created[im] + 1)
                emit(ts, b, im, 0, 0)
                lk = rng.random(im.size) < 0.15
                emit(ts[lk] + 1, b, im[lk], 2, 0)

    def engage_soon(account, imgs, max_delay_s, extra_events, surface):
        """account opens, clicks and likes each image soon after it is posted, plus extra_events
        ((event, probability), ...)."""
        if imgs.size == 0:
            return
        ts = created[imgs] + 60 + rng.integers(0, max_delay_s, imgs.size)
        ts = np.minimum(ts, t_end - 60)
        for ev in (0, 1, 2):
            emit(ts + ev, account, imgs, ev, surface)
        for ev, prob in extra_events:
            sel = rng.random(imgs.size) < prob
            emit(ts[sel] + ev, account, imgs[sel], ev, surface)

    def cover_traffic(account):
        """Human-like volume: a few dozen random impressions a day, a few likes."""
        rate = rng.uniform(*cfg.cover_impressions_per_day)
        m = int(rng.poisson(rate * cfg.n_days))
        ts = t0 + rng.integers(0, cfg.n_days * DAY_S, m)
        im = rng.choice(n_images, m, p=exposure / exposure.sum())
        ok = created[im] < ts
        ts, im = ts[ok], im[ok]
        emit(ts, account, im, 0, 0)
        lk = rng.random(im.size) < cfg.cover_like_rate
        emit(ts[lk] + 1, account, im[lk], 1, 0)
        emit(ts[lk] + 2, account, im[lk], 2, 0)

    ring_images = {int(m): np.flatnonzero(creator == m) for ring in rings for m in ring}
    for ring in rings:  # every member clicks, likes and remixes every other member's images
        for m in ring:
            others = np.concatenate([ring_images[int(o)] for o in ring if o != m])
            engage_soon(int(m), others, DAY_S, ((5, 1.0),), 1)
            cover_traffic(int(m))
    b_next = first_booster
    for c, n_b in zip(boosted, booster_counts):
        imgs = np.flatnonzero(creator == c)
        pushed_by[imgs] = "booster"
        for _ in range(int(n_b)):
            sel = imgs[rng.random(imgs.size) < cfg.booster_coverage]
            engage_soon(b_next, sel, 2 * DAY_S, ((3, 0.4), (5, 0.25)), 1)
            cover_traffic(b_next)
            b_next += 1
    for b in range(b_next, n_all_users):  # boosters of a creator that could not be drawn: cover only
        cover_traffic(b)

    selfi = np.flatnonzero(rng.random(n_images) < cfg.self_engage_frac)
    for ev in (0, 2, 3, 4, 5):
        emit(created[selfi] + 60 + ev, creator[selfi], selfi, ev, 1)
    fixed = sum(a.size for a in cols["ts"])

    # --- organic traffic -------------------------------------------------------------------------
    budget = max(0, cfg.n_events - fixed)
    fshare = 0.6 * img_followers / (img_followers + 200.0)
    surface_logits = cfg.surface_bias * np.array([0.0, 0.8, 0.3, 0.0])

    def decayed_time(im):
        span = (t_end - created[im]).astype(np.float64)
        scale = 2.0 * DAY_S
        v = rng.random(im.size)
        delay = -scale * np.log1p(-v * (1 - np.exp(-span / scale)))
        return created[im] + 1 + np.minimum(delay.astype(np.int64), (span - 600).astype(np.int64))

    def funnel(us, im, surface, ts, budget_left):
        """Engagement events of people us shown images im: emitted up to budget_left events."""
        util = quality[im] + np.einsum("ij,ij->i", taste[us], style[im])
        sl = surface_logits[surface]
        r = rng.random((5, im.size))
        click = r[0] < _sigmoid(-2.8 + 1.2 * util + sl)
        like = click & (r[1] < _sigmoid(-0.3 + 1.2 * util + 0.5 * sl))
        save = like & (r[2] < _sigmoid(-1.5 + util))
        share = like & (r[3] < _sigmoid(-2.0 + util))
        remix = click & (r[4] < _sigmoid(-2.5 + util))
        flags = [np.ones(im.size, bool), click, like, save, share, remix]
        keep = np.cumsum(np.sum(flags, axis=0)) <= budget_left
        for ev, f in enumerate(flags):
            sel = f & keep
            emit(ts[sel] + 3 * ev, us[sel], im[sel], ev, surface[sel])
        return int(sum((f & keep).sum() for f in flags))

    # prompt pages: a user opens the page of an image's prompt and sees it with up to a few other
    # images of that prompt posted before, 15 s apart
    gl, gh = cfg.gallery_size
    n_pages = int(cfg.gallery_frac * budget / (1.15 * (gl + gh) / 2))
    if n_pages:
        width = int(per_prompt.max())
        slots = np.full((n_prompts, width), -1, np.int64)
        first = np.concatenate([[0], np.cumsum(per_prompt)[:-1]])
        col = np.arange(n_images) - first[img_prompt]
        slots[img_prompt, col] = np.arange(n_images)
        anchor = rng.choice(n_images, n_pages, p=exposure / exposure.sum())
        start = decayed_time(anchor)
        cand = slots[img_prompt[anchor]]
        valid = (cand >= 0) & (cand != anchor[:, None])
        valid &= created[np.maximum(cand, 0)] < start[:, None]
        keys = np.log(exposure[np.maximum(cand, 0)]) + rng.gumbel(size=cand.shape)
        keys[~valid] = -np.inf
        order = np.argsort(-keys, axis=1, kind="stable")
        ranked = np.take_along_axis(cand, order, axis=1)
        ranked_ok = np.take_along_axis(valid, order, axis=1)
        n_other = rng.integers(gl, gh + 1, n_pages) - 1
        shown_other = ranked_ok & (np.arange(width)[None, :] < n_other[:, None])
        pages = np.concatenate([anchor[:, None], ranked], axis=1)
        shown = np.concatenate([np.ones((n_pages, 1), bool), shown_other], axis=1)
        # the anchor is not always first on the page
        pos_key = rng.random(shown.shape)
        pos_key[~shown] = np.inf
        position = np.argsort(np.argsort(pos_key, axis=1, kind="stable"), axis=1, kind="stable")
        page_id, slot = np.nonzero(shown)
        pg_user = rng.choice(n_users, n_pages, p=activity / activity.sum())
        im = pages[page_id, slot]
        ts = np.minimum(start[page_id] + 15 * position[page_id, slot], t_end - 60)
        budget -= funnel(pg_user[page_id], im, np.full(im.size, 3, np.int8), ts, budget)

    # the feed: single images, heavy-tailed exposure, followers and the featured slot
    n_imp = budget  # upper bound: every impression is at least one event
    im = rng.choice(n_images, n_imp, p=exposure / exposure.sum())
    us = rng.choice(n_users, n_imp, p=activity / activity.sum())
    u = rng.random(n_imp)
    surface = np.where(featured[im] & (u < 0.7), 2, np.where(rng.random(n_imp) < fshare[im], 1, 0)).astype(
        np.int8
    )
    funnel(us, im, surface, decayed_time(im), budget)

    # --- assemble, sort by time, write day partitions ---------------------------------------------
    TS = np.concatenate(cols["ts"])
    U = np.concatenate(cols["user"])
    I = np.concatenate(cols["image"])
    E = np.concatenate(cols["event"])
    S = np.concatenate(cols["surface"])
    TS = np.minimum(TS, t_end - 1)  # every event lands in one of the n_days day files
    order = np.lexsort((E, I, U, TS))
    TS, U, I, E, S = TS[order], U[order], I[order], E[order], S[order]
    n = TS.size
    event_names = ["impression", "click", "like", "save", "share", "remix"]
    surface_names = ["explore", "following", "featured", "prompt"]
    eid = pc.binary_join_element_wise("e", pc.cast(pa.array(np.arange(n, dtype=np.int64)), pa.string()), "")
    day = (TS - t0) // DAY_S
    bounds = np.searchsorted(day, np.arange(cfg.n_days + 1))
    files = []
    for d in range(cfg.n_days):
        a, b = bounds[d], bounds[d + 1]
        if a == b:
            continue
        t = pa.table(
            {
                "ts": pa.array(TS[a:b].astype("datetime64[s]").astype("datetime64[ms]")),
                "user_id": _dict_array(U[a:b], user_ids),
                "image_id": _dict_array(I[a:b], image_ids),
                "event": _dict_array(E[a:b], event_names),
                "event_id": eid[a:b],
                "surface": _dict_array(S[a:b], surface_names),
            }
        )
        name = f"events-{str(np.datetime64(int(t0 + d * DAY_S), 's'))[:10]}.parquet"
        pq.write_table(t, out_dir / name, compression="zstd", row_group_size=1_000_000)
        files.append(name)

    images = {
        "image_id": list(image_ids),
        "path": list(paths),
        "prompt": list(prompts),
        "prompt_id": [f"p{p:05d}" for p in img_prompt] if cfg.with_prompt_id else [None] * n_images,
        "creator_id": [user_ids[c] for c in creator],
        "created_at": created.astype("datetime64[s]"),
        "model": [("sim-a", "sim-b")[i % 2] for i in range(n_images)],
    }
    n_bad_events = n_bad_images = 0
    if cfg.inject_bad:
        n_bad_events, n_bad_images = _inject_bad(out_dir, cfg, rng, images, created, t0, eid)
    img_table = pa.table(
        {
            k: (pa.array(v, pa.timestamp("s")) if k == "created_at" else pa.array(v, pa.string()))
            for k, v in images.items()
        }
    )
    pq.write_table(img_table, out_dir / "images.parquet", compression="zstd")

    pq.write_table(
        pa.table(
            {
                "image_id": image_ids,
                "quality": quality,
                "style_0": style[:, 0],
                "style_1": style[:, 1],
                "featured": featured,
                "creator_followers": img_followers,
                "creator_id": [user_ids[c] for c in creator],
                "bot_target": np.isin(np.arange(n_images), targets),
                "pushed_by": pa.array(list(pushed_by), pa.string()),
            }
        ),
        truth_dir / "images_truth.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "user_id": user_ids,
                "taste_0": taste[:, 0],
                "taste_1": taste[:, 1],
                "is_bot": np.arange(n_all_users) >= n_users,
                "bot_kind": pa.array(list(bot_kind), pa.string()),
                "is_creator": np.isin(np.arange(n_all_users), creator),
            }
        ),
        truth_dir / "users_truth.parquet",
    )
    summary = {
        "config": asdict(cfg),
        "events": int(n) + n_bad_events,
        "events_clean": int(n),
        "bad_events": n_bad_events,
        "bad_images": n_bad_images,
        "images": n_images,
        "prompts": n_prompts,
        "users": n_users,
        "bots": int(n_all_users - n_users),
        "bots_by_kind": {k: int((bot_kind == k).sum()) for k in ("fast", "slow", "ring", "booster")},
        "boosted_creators": [user_ids[c] for c in boosted],
        "bot_targets": int(targets.size),
        "self_events": int(selfi.size * 5),
        "event_files": files,
        "social_dir": str(out_dir),
        "truth_dir": str(truth_dir),
    }
    (truth_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


BAD_EVENT_REASONS = (
    "unparsable timestamp",
    "unknown event",
    "missing user id",
    "unknown image",
    "event before image created",
    "duplicate event id",
    "image rejected",
)
BAD_IMAGE_REASONS = ("missing image file", "unreadable image", "duplicate image id", "missing prompt")


def _inject_bad(out_dir, cfg, rng, images, created, t0, eid) -> tuple[int, int]:
    """Append k bad rows per reject reason: an events CSV (sorts after the day files) and extra
    image rows. Returns (bad event rows, bad image rows)."""
    k = cfg.inject_bad
    n_img = len(images["image_id"])
    rows = []

    def ts_str(t):
        return str(np.datetime64(int(t), "s")).replace("T", " ")

    for j in range(k):
        i = int(rng.integers(n_img))
        good_ts = ts_str(max(created[i] + 3600, t0))
        iid = images["image_id"][i]
        rows.append(("not a time", "u0000001", iid, "like", f"bad-ts-{j}", "explore"))
        rows.append((good_ts, "u0000001", iid, "dislike", f"bad-ev-{j}", "explore"))
        rows.append((good_ts, "", iid, "like", f"bad-user-{j}", "explore"))
        rows.append((good_ts, "u0000001", f"nosuch{j}", "like", f"bad-img-{j}", "explore"))
        rows.append((ts_str(created[i] - DAY_S), "u0000001", iid, "like", f"bad-early-{j}", "explore"))
        rows.append((good_ts, "u0000001", iid, "like", str(eid[j].as_py()), "explore"))
    # images that will be rejected (missing file, unreadable, duplicate id, missing prompt)
    extra = []
    for j in range(k):
        extra.append((f"xmissing{j}", f"files/xmissing{j}.jpg", "a lost file", "missing image file"))
        (out_dir / "files" / f"xbroken{j}.jpg").write_bytes(b"\xff\xd8 this is not a jpeg" * 3)
        extra.append((f"xbroken{j}", f"files/xbroken{j}.jpg", "a broken file", "unreadable image"))
        extra.append((images["image_id"][j], images["path"][j], images["prompt"][j], "duplicate image id"))
        extra.append((f"xnoprompt{j}", images["path"][j], None, "missing prompt"))
    for iid, path, prompt, _reason in extra:
        images["image_id"].append(iid)
        images["path"].append(path)
        images["prompt"].append(prompt)
        images["prompt_id"].append(None)
        images["creator_id"].append("u0000002")
        images["created_at"] = np.append(images["created_at"], np.datetime64(int(t0), "s"))
        images["model"].append("sim-a")
        if _reason in ("missing image file", "unreadable image", "missing prompt"):
            rows.append((ts_str(t0 + DAY_S), "u0000001", iid, "like", f"bad-rejimg-{iid}", "explore"))
    import csv

    with open(out_dir / "events-zz-bad.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ts", "user_id", "image_id", "event", "event_id", "surface"])
        w.writerows(rows)
    return len(rows), len(extra)


def write_social_input(
    social_dir: Path, images: list[dict], events: list[dict], fmt: str = "parquet", draw_missing: bool = True
) -> Path:
    """Write a hand-made log in the input contract (for tests and demos).

    images: dicts with image_id, prompt and optionally path, prompt_id, creator_id, created_at, model;
    a missing path becomes files/<image_id>.jpg, drawn deterministically when draw_missing.
    events: dicts with ts, user_id, image_id, event and optionally event_id, surface; they are
    written to one file per day (events-YYYY-MM-DD.<fmt>), rows with an unparsable ts to
    events-unparsed.<fmt>."""
    import csv

    social_dir = Path(social_dir)
    (social_dir / "files").mkdir(parents=True, exist_ok=True)
    rows = []
    for k, im in enumerate(images):
        im = dict(im)
        if not im.get("path"):
            im["path"] = f"files/{im['image_id']}.jpg"
            if draw_missing:
                (social_dir / im["path"]).write_bytes(_jpeg(np.random.default_rng([7, k]), 32))
        rows.append(im)
    img_cols = ["image_id", "path", "prompt", "prompt_id", "creator_id", "created_at", "model"]
    ev_cols = ["ts", "user_id", "image_id", "event", "event_id", "surface"]
    used_ev = [c for c in ev_cols if any(c in e for e in events)] or ev_cols[:4]

    def _write(path: Path, cols: list[str], data: list[dict]):
        if fmt == "csv":
            with open(path.with_suffix(".csv"), "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(cols)
                for d in data:
                    w.writerow(["" if d.get(c) is None else str(d.get(c)) for c in cols])
        else:
            pq.write_table(
                pa.table(
                    {
                        c: pa.array([None if d.get(c) is None else str(d.get(c)) for d in data], pa.string())
                        for c in cols
                    }
                ),
                path.with_suffix(".parquet"),
            )

    _write(social_dir / "images.x", img_cols, rows)
    by_day: dict[str, list[dict]] = {}
    for e in events:
        ts = str(e.get("ts", ""))
        day = ts[:10] if len(ts) >= 10 and ts[4] == "-" and ts[7] == "-" else "unparsed"
        by_day.setdefault(day, []).append(e)
    for day, evs in sorted(by_day.items()):
        _write(social_dir / f"events-{day}.x", used_ev, evs)
    return social_dir
