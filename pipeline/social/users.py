"""Few-shot per-user preference sets (PPD / PAL style) drawn from the per-user pairs."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.ids import stable_key


def draw_user_sets(pairs: pa.Table, k: int = 4, seed: int = 0, max_users: int | None = None) -> pa.Table:
    """For every user with at least k per-user pairs, k of them, chosen deterministically.

    Pairs of one user are ranked by stable_key(seed, user_id, pair_id) and the first k kept; users
    are ordered by stable_key(seed, user_id) and the first max_users kept (all when None). The same
    pairs, k and seed always give the same table: the input rows plus `set_index` (0..k-1).
    Population pairs (user_id null) are ignored."""
    if k < 1:
        raise ValueError("k must be >= 1")
    user_rows = pairs.filter(pc.field("kind") == "user") if "kind" in pairs.column_names else pairs
    user_rows = user_rows.filter(pc.is_valid(user_rows.column("user_id")))
    users = user_rows.column("user_id").to_pylist()
    pids = user_rows.column("pair_id").to_pylist()
    by_user: dict[str, list[tuple[str, int]]] = {}
    for i, (u, p) in enumerate(zip(users, pids)):
        by_user.setdefault(u, []).append((stable_key("user-set", seed, u, p), i))
    chosen_users = sorted((stable_key("user-order", seed, u), u) for u, v in by_user.items() if len(v) >= k)
    if max_users is not None:
        chosen_users = chosen_users[:max_users]
    take: list[int] = []
    set_index: list[int] = []
    for _, u in chosen_users:
        picked = sorted(by_user[u])[:k]
        take.extend(i for _, i in picked)
        set_index.extend(range(k))
    out = user_rows.take(pa.array(take, pa.int64()))
    return out.append_column("set_index", pa.array(set_index, pa.int32()))
