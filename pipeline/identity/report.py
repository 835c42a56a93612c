"""The identity stage's report: evaluation against folder-name labels, and the pictures for the UI."""

from __future__ import annotations

from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa

from pipeline.faces.crops import CropReader
from pipeline.viz import contact_sheet, histogram_png


def folder_labels(faces: pa.Table, images: pa.Table) -> dict[tuple[str, int], str]:
    """Ground truth from folder names, for single-face images only, where folders are one person each.

    A folder counts as a person's label only when its parent holds two or more such folders of
    single-face photos: the people/<name>/photo.jpg layout (LFW, ../shared/data/faces/identities).
    A lone folder of photos (the demo's portraits/, with Obama and Biden in it) is not a person:
    reading it as one would score a correct clustering as wrong.
    """
    source = dict(zip(images.column("uid").to_pylist(), images.column("source").to_pylist()))
    count: dict[str, int] = {}
    for u in faces.column("uid").to_pylist():
        count[u] = count.get(u, 0) + 1
    candidates: dict[tuple[str, int], PurePosixPath] = {}
    for u, fi in zip(faces.column("uid").to_pylist(), faces.column("face_index").to_pylist()):
        folder = PurePosixPath(source.get(u, "") or "").parent
        if count[u] == 1 and folder.name:
            candidates[(u, int(fi))] = folder
    siblings: dict[PurePosixPath, set[str]] = {}
    for folder in candidates.values():
        siblings.setdefault(folder.parent, set()).add(folder.name)
    return {k: folder.name for k, folder in candidates.items() if len(siblings[folder.parent]) >= 2}


def evaluate_against_labels(assignments: pa.Table, labels: dict[tuple[str, int], str]) -> dict | None:
    from pipeline.identity.metrics import evaluate

    pred, true = [], []
    for u, fi, ident in zip(*(assignments.column(c).to_pylist() for c in ("uid", "face_index", "identity_id"))):
        lab = labels.get((u, int(fi)))
        if lab is not None:
            pred.append(ident)
            true.append(lab)
    if len(set(true)) < 2:
        return None
    codes_p = {v: i for i, v in enumerate(sorted(set(pred)))}
    codes_t = {v: i for i, v in enumerate(sorted(set(true)))}
    m = evaluate(np.array([codes_p[p] for p in pred]), np.array([codes_t[t] for t in true]))
    m["n_labelled_faces"] = len(true)
    return m


def identity_figures(result, crops: CropReader, n_identities: int = 6, per_identity: int = 6, n_doubtful: int = 8) -> dict[str, bytes]:
    figs: dict[str, bytes] = {}
    sizes = result.summary.column("size").to_numpy() if result.summary.num_rows else np.zeros(0)
    figs["cluster_sizes"] = histogram_png({"identities": sizes}, "Identity sizes (faces per identity)", "faces", bins=min(30, max(5, int(sizes.max(initial=1)))))
    st = result.stats
    figs["similarity_within_vs_across"] = histogram_png(
        {"same identity": st.get("similarity_within", []), "different identities": st.get("similarity_across", [])},
        "kNN-edge cosine similarity",
        "cosine",
    )
    tiles = []
    top = sorted(result.summary.to_pylist(), key=lambda r: (-r["size"], r["identity_id"]))[:n_identities]
    members: dict[str, list[tuple[str, int, float]]] = {}
    for r in result.assignments.to_pylist():
        members.setdefault(r["identity_id"], []).append((r["uid"], r["face_index"], r["sim_to_centroid"]))
    for ident in top:
        ms = sorted(members[ident["identity_id"]], key=lambda m: -m[2])[:per_identity]
        for j, (u, fi, s) in enumerate(ms):
            c = crops.crop(u, fi)
            if c is not None:
                tiles.append((c, f"{ident['identity_id']} n={ident['size']}\ncos->centre {s:.2f}"))
    figs["largest_identities"] = contact_sheet(tiles, cols=per_identity, tile=96)
    tiles = []
    for d in st.get("doubtful_merges", [])[:n_doubtful]:
        a, b = crops.crop(d["uid_a"], d["face_index_a"]), crops.crop(d["uid_b"], d["face_index_b"])
        if a is not None and b is not None:
            tiles += [(a, f"{d['identity_id']}\ncos {d['similarity']:.3f}"), (b, "(same id)")]
    figs["most_doubtful_merges"] = contact_sheet(tiles, cols=4, tile=96)
    return figs
