"""Exact kNN with PyTorch (CUDA, or CPU for tests): half-precision matrix products, a two-level
top-k, and a float32 re-rank.

Per query block Q (B x D) and database chunk X_c (C x D):

1. ``S = Q @ X_c.T`` in half precision (fp16 by default: unit vectors cannot overflow it and it
   keeps 3 more mantissa bits than bf16); cuBLAS accumulates in fp32.
2. Two-level top-t, t = k + 1 + ``margin``: the C columns are cut into groups of ``group``
   contiguous columns; ``amax`` per group, ``topk(t)`` over the C / group maxima, then ``topk(t)``
   over the t x group values of the chosen groups. Exact (ties aside): the t largest values of a
   row lie in the t groups with the largest maxima. The full-width ``topk`` over C (or N)
   columns, which costs far more than the matrix product on a GPU, is never run.
3. The chunk's t candidates are merged into the block's running t candidates (``topk`` over 2t).
4. After the last chunk the t candidates are re-scored in float32 (from a float32 copy of the
   database when it fits the memory budget, else from the half-precision copy with float32
   accumulation) and the top k + 1 kept; the query itself is then dropped by the caller.

The margin makes the result exact up to half-precision rounding: a true neighbour is lost only
if more than ``margin`` other vectors score within the fp16 rounding (~5e-4) of the k-th one.

Memory: the database is uploaded once and stays on the device in half precision (N x D x 2
bytes; 1M x 512 = 1 GiB) while every query block is processed; queries are views of it (a
self-join uploads nothing else). If it does not fit ``max_resident_bytes`` (default: half of the
free device memory) it is cut into parts that do: each part is uploaded once, every query block
is scanned against it, and the running candidates of all N queries stay on the device.
"""

from __future__ import annotations

import math
import time

import numpy as np

DEFAULT_MARGIN = 16
DEFAULT_GROUP = 32


def _defaults(device: str) -> dict:
    if device.startswith("cuda"):
        return {"query_block": 16_384, "db_chunk": 65_536}
    return {"query_block": 1024, "db_chunk": 8192}


def topk_two_level(S, t: int, group: int):
    """(values, column indices) of the t largest entries per row of S (B x C), sorted descending.

    Exact up to ties; see the module docstring. Columns past the last full group are handled by
    padding with -inf."""
    import torch

    B, C = S.shape
    t = min(t, C)
    if C <= max(4 * t, group) or group <= 1:
        return torch.topk(S, t, dim=1, largest=True, sorted=True)
    n_groups = math.ceil(C / group)
    if n_groups * group != C:
        pad = torch.full((B, n_groups * group - C), float("-inf"), dtype=S.dtype, device=S.device)
        S = torch.cat([S, pad], 1)
    G = S.view(B, n_groups, group).amax(dim=2)
    tg = min(t, n_groups)
    _, gi = torch.topk(G, tg, dim=1, largest=True, sorted=False)
    cols = (gi.unsqueeze(2) * group + torch.arange(group, device=S.device)).reshape(B, tg * group)
    vals = torch.gather(S, 1, cols)
    v, p = torch.topk(vals, t, dim=1, largest=True, sorted=True)
    return v, torch.gather(cols, 1, p)


def _merge(best_v, best_i, v, i, t: int):
    import torch

    allv = torch.cat([best_v, v.to(best_v.dtype)], 1)
    alli = torch.cat([best_i, i], 1)
    nv, p = torch.topk(allv, t, dim=1, largest=True, sorted=True)
    return nv, torch.gather(alli, 1, p)


def _free_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return 1 << 62  # host memory: the caller's array already lives there


def knn_torch_exact(
    E,
    k: int,
    device: str | None = None,
    dtype: str = "float16",
    query_block: int | None = None,
    db_chunk: int | None = None,
    group: int = DEFAULT_GROUP,
    margin: int = DEFAULT_MARGIN,
    max_resident_bytes: int | None = None,
    rerank: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Top-(k+1) neighbours of every row of E among all rows (the row itself included), rows
    sorted by decreasing similarity. E: float32 numpy array (N x D) or a torch tensor (any
    device). Returns (indices int64, similarities float32, info)."""
    import torch

    t_start = time.perf_counter()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    cdtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    d = _defaults(dev.type)
    qb = int(query_block or d["query_block"])
    dc = int(db_chunk or d["db_chunk"])
    N, D = int(E.shape[0]), int(E.shape[1])
    kk = min(k + 1, N)
    t = min(kk + max(0, margin), N)
    esize = torch.tensor([], dtype=cdtype).element_size()
    budget = int(max_resident_bytes if max_resident_bytes is not None else _free_bytes(dev) // 2)
    half_bytes = N * D * esize
    n_parts = max(1, math.ceil(half_bytes / max(budget, 1)))
    part_rows = math.ceil(N / n_parts)
    keep_fp32 = rerank and cdtype != torch.float32 and n_parts == 1 and half_bytes + N * D * 4 <= budget
    info = {
        "device": str(dev),
        "dtype": dtype,
        "query_block": qb,
        "db_chunk": dc,
        "group": group,
        "margin": margin,
        "candidates_per_query": t,
        "resident_parts": n_parts,
        "rerank_from": (
            ("float32 copy" if keep_fp32 else "half copy, float32 sums") if n_parts == 1 else "caller array"
        )
        if rerank
        else "none",
    }

    def upload(s: int, e: int, dt):
        if isinstance(E, torch.Tensor):
            return E[s:e].to(device=dev, dtype=dt)
        blk = np.ascontiguousarray(E[s:e], dtype=np.float32)
        return torch.from_numpy(blk).to(device=dev, dtype=dt)

    def host_rows(ids: np.ndarray) -> np.ndarray:
        if isinstance(E, torch.Tensor):
            return E[torch.from_numpy(ids).to(E.device)].float().cpu().numpy()
        return np.asarray(E[ids], dtype=np.float32)

    def upload_all(dt):
        out = torch.empty((N, D), dtype=dt, device=dev)
        step = 1 << 18
        for s in range(0, N, step):  # in slices: no full-size float32 staging copy on the device
            out[s : min(N, s + step)] = upload(s, min(N, s + step), dt)
        return out

    t0 = time.perf_counter()
    with torch.no_grad():
        if n_parts == 1:
            X = upload_all(cdtype)
            X32 = upload_all(torch.float32) if keep_fp32 else None
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            info["upload_s"] = time.perf_counter() - t0
            I_out = np.empty((N, kk), np.int64)
            S_out = np.empty((N, kk), np.float32)
            for qs in range(0, N, qb):
                qe = min(N, qs + qb)
                Q = X[qs:qe]
                bv = torch.full((qe - qs, t), float("-inf"), dtype=torch.float32, device=dev)
                bi = torch.full((qe - qs, t), -1, dtype=torch.int64, device=dev)
                for cs in range(0, N, dc):
                    ce = min(N, cs + dc)
                    v, i = topk_two_level(Q @ X[cs:ce].T, t, group)
                    bv, bi = _merge(bv, bi, v, i + cs, t)
                Ib, Sb = _rerank(
                    Q if X32 is None else X32[qs:qe], X32 if X32 is not None else X, bi, bv, kk, rerank
                )
                I_out[qs:qe] = Ib.cpu().numpy()
                S_out[qs:qe] = Sb.cpu().numpy()
        else:
            # streaming: each database part is uploaded once; all queries' candidates stay on the device
            info["upload_s"] = 0.0
            bv_all = torch.full((N, t), float("-inf"), dtype=torch.float32, device=dev)
            bi_all = torch.full((N, t), -1, dtype=torch.int64, device=dev)
            for ps in range(0, N, part_rows):
                pe = min(N, ps + part_rows)
                tu = time.perf_counter()
                Xp = upload(ps, pe, cdtype)
                info["upload_s"] += time.perf_counter() - tu
                for qs in range(0, N, qb):
                    qe = min(N, qs + qb)
                    Q = upload(qs, qe, cdtype)
                    bv, bi = bv_all[qs:qe], bi_all[qs:qe]
                    for cs in range(0, pe - ps, dc):
                        ce = min(pe - ps, cs + dc)
                        v, i = topk_two_level(Q @ Xp[cs:ce].T, t, group)
                        bv, bi = _merge(bv, bi, v, i + (ps + cs), t)
                    bv_all[qs:qe], bi_all[qs:qe] = bv, bi
                del Xp
            I_out = np.empty((N, kk), np.int64)
            S_out = np.empty((N, kk), np.float32)
            for qs in range(0, N, qb):
                qe = min(N, qs + qb)
                bi = bi_all[qs:qe]
                if rerank:  # candidates re-scored in float32 from the caller's array
                    Q32 = upload(qs, qe, torch.float32)
                    Xc = torch.from_numpy(host_rows(bi.clamp_min(0).cpu().numpy().ravel())).to(dev)
                    sims = torch.bmm(Xc.view(qe - qs, t, D), Q32.unsqueeze(2)).squeeze(2)
                    sims = torch.where(bi >= 0, sims, torch.full_like(sims, float("-inf")))
                    Sb, p = torch.topk(sims, kk, dim=1)
                    Ib = torch.gather(bi, 1, p)
                else:
                    Sb, Ib = bv_all[qs:qe, :kk], bi[:, :kk]
                I_out[qs:qe] = Ib.cpu().numpy()
                S_out[qs:qe] = Sb.float().cpu().numpy()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    info["search_s"] = time.perf_counter() - t0 - info["upload_s"]
    info["total_s"] = time.perf_counter() - t_start
    return I_out, S_out, info


def _rerank(Q, X, bi, bv, kk: int, rerank: bool, sub: int = 4096):
    """float32 similarities of each query to its candidates, top kk (sorted)."""
    import torch

    if not rerank:
        return bi[:, :kk], bv[:, :kk]
    outI, outS = [], []
    for s in range(0, Q.shape[0], sub):
        e = min(Q.shape[0], s + sub)
        cand = bi[s:e]
        Xc = X[cand.clamp_min(0)].float()  # (b, t, D)
        sims = torch.bmm(Xc, Q[s:e].float().unsqueeze(2)).squeeze(2)
        sims = torch.where(cand >= 0, sims, torch.full_like(sims, float("-inf")))
        v, p = torch.topk(sims, kk, dim=1, largest=True, sorted=True)
        outI.append(torch.gather(cand, 1, p))
        outS.append(v)
    return torch.cat(outI), torch.cat(outS)
