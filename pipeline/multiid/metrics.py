"""MultiID-Bench metrics (WithAnyone): Sim(GT), Sim(Ref) and the copy-paste measure M_CP.

For a generated image G against its target (ground truth) T and references R:

* faces of G are matched to T's faces with the Hungarian algorithm on cosine similarity
  (maximising total similarity); ``Sim(GT)`` = mean over T's persons of the matched cosine
  (a person with no matched generated face counts 0);
* likewise G's faces are Hungarian-matched to the references (the first reference of each person)
  for ``Sim(Ref)``;
* per person matched in the G<->T assignment, with theta = arccos(cosine):
  ``M_CP = (theta_gt - theta_gr) / max(theta_tr, eps)``, theta_gt between G and T's face,
  theta_gr between G and the person's reference, theta_tr between T's face and the reference;
  clipped to [-1, 1]. -1: G is the ground truth (no copy of the reference); +1: G is the reference
  pasted (copy-paste). The image's M_CP is the mean over its matched persons.

``dataset_quality_stats`` applies the same quantities to the dataset itself (target-reference
similarity and angle, pose difference, hash distances), and ``evaluate_folder`` scores a model's
generated images (file name = sample key) against a built dataset.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
from scipy.optimize import linear_sum_assignment

EPS = 1e-6
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def _unit(x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    a = a.reshape(1, -1) if a.ndim == 1 else a
    if a.size == 0:
        return a.reshape(0, a.shape[-1] if a.ndim == 2 else 0)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def cosine_matrix(a, b) -> np.ndarray:
    A, B = _unit(a), _unit(b)
    if A.shape[0] == 0 or B.shape[0] == 0:
        return np.zeros((A.shape[0], B.shape[0]))
    return A @ B.T


def hungarian_match(sim: np.ndarray, min_sim: float | None = None) -> list[tuple[int, int, float]]:
    """One-to-one matching maximising total similarity: [(row, col, sim)], rows ascending."""
    sim = np.asarray(sim, dtype=np.float64)
    if sim.size == 0:
        return []
    r, c = linear_sum_assignment(-sim)
    out = [(int(i), int(j), float(sim[i, j])) for i, j in zip(r, c)]
    if min_sim is not None:
        out = [m for m in out if m[2] >= min_sim]
    return out


def angle(cos) -> np.ndarray:
    return np.arccos(np.clip(np.asarray(cos, dtype=np.float64), -1.0, 1.0))


def copy_paste(cos_gt, cos_gr, cos_tr, eps: float = EPS):
    """M_CP = (theta_gt - theta_gr) / max(theta_tr, eps), clipped to [-1, 1] (arrays broadcast)."""
    t_gt, t_gr, t_tr = angle(cos_gt), angle(cos_gr), angle(cos_tr)
    m = np.clip((t_gt - t_gr) / np.maximum(t_tr, eps), -1.0, 1.0)
    return float(m) if np.ndim(m) == 0 else m


def sample_metrics(gen, gt, ref) -> dict:
    """Metrics for one generated image. gen: (G, D) generated faces; gt: (P, D) target persons;
    ref: (P, D) one reference per person (row i is person i's reference)."""
    gen, gt, ref = _unit(gen), _unit(gt), _unit(ref)
    P = gt.shape[0]
    S_gt = cosine_matrix(gen, gt)
    S_ref = cosine_matrix(gen, ref)
    m_gt = hungarian_match(S_gt)
    m_ref = hungarian_match(S_ref)
    sim_gt = sum(s for _, _, s in m_gt) / max(P, 1)
    sim_ref = sum(s for _, _, s in m_ref) / max(P, 1)
    persons = []
    for g, p, s in m_gt:
        c_gr = float(gen[g] @ ref[p])
        c_tr = float(gt[p] @ ref[p])
        persons.append({"person": p, "gen_face": g, "cos_gt": s, "cos_gr": c_gr, "cos_tr": c_tr, "m_cp": copy_paste(s, c_gr, c_tr)})
    return {
        "sim_gt": float(sim_gt),
        "sim_ref": float(sim_ref),
        "m_cp": float(np.mean([p["m_cp"] for p in persons])) if persons else float("nan"),
        "n_generated_faces": int(gen.shape[0]),
        "n_persons": int(P),
        "n_matched": len(m_gt),
        "persons": persons,
    }


def _quantiles(v) -> dict:
    v = np.asarray([x for x in v if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"n": 0}
    qs = [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0]
    d = {f"p{int(q * 100)}": round(float(x), 4) for q, x in zip(qs, np.quantile(v, qs))}
    d.update(n=int(v.size), mean=round(float(v.mean()), 4))
    return d


def dataset_quality_stats(pairs: pa.Table) -> dict:
    """Distributions over the selected (target person, reference) pairs."""
    if pairs.num_rows == 0:
        return {"pairs": 0}
    col = lambda n: pairs.column(n).to_pylist()
    return {
        "pairs": pairs.num_rows,
        "target_ref_similarity": _quantiles(col("similarity")),
        "theta_tr_rad": _quantiles(col("theta_tr")),
        "pose_diff_deg": _quantiles(col("pose_diff")),
        "face_hamming": _quantiles(col("face_hamming")),
        "image_hamming": _quantiles(col("image_hamming")),
        "face_ncc": _quantiles(col("face_ncc")),
        "ref_quality": _quantiles(col("ref_quality")),
        # A generator that returns the reference scores Sim(GT) = target-ref similarity and M_CP = +1;
        # one that returns the target scores Sim(Ref) = target-ref similarity and M_CP = -1.
        "sim_gt_of_reference_copy": _quantiles(col("similarity")),
    }


def load_samples(dataset, first: int | None = None) -> list[dict]:
    """Sample JSONs from a dataset folder (its tars, recursively), a list of dicts, or a table with a 'json' column;
    ``first``: only the first that many (in tar order; a folder's other samples are not read)."""
    if first is not None:
        return load_samples(dataset)[:first] if isinstance(dataset, (list, pa.Table)) else _first_samples(dataset, first)
    if isinstance(dataset, list):
        return dataset
    if isinstance(dataset, pa.Table):
        return [json.loads(j) if isinstance(j, (str, bytes)) else j for j in dataset.column("json").to_pylist()]
    out = []
    from pipeline.storage import as_dir

    for tar in sorted(as_dir(dataset).rglob("*.tar")):
        with tar.open("rb") as f, tarfile.open(fileobj=f) as tf:
            for m in tf.getmembers():
                if m.isfile() and m.name.endswith(".json"):
                    out.append(json.loads(tf.extractfile(m).read()))
    return out


def _first_samples(folder, n: int) -> list[dict]:
    from pipeline.storage import as_dir

    out = []
    for tar in sorted(as_dir(folder).rglob("*.tar")):
        with tar.open("rb") as f, tarfile.open(fileobj=f) as tf:
            for m in tf:
                if len(out) >= n:
                    return out
                if m.isfile() and m.name.endswith(".json"):
                    out.append(json.loads(tf.extractfile(m).read()))
    return out


def evaluate_folder(generated_dir, dataset_dir_or_table, backend) -> dict:
    """Score generated images ``<key>.<jpg|png|...>`` against the dataset's targets and references.

    ``backend``: an object with ``analyze([rgb]) -> [[face...]]`` or a backend name (then
    ``pipeline.faces.get_backend(name)``). The dataset's embeddings
    must come from the same backend (checked). Returns per-image metrics and their means; images
    whose key is not in the dataset, and dataset samples with no generated image, are listed.
    """
    from pipeline.faces import get_backend
    from pipeline.faces.folders import load_rgb_bytes

    be = get_backend(backend) if isinstance(backend, str) else backend
    samples = {s["key"]: s for s in load_samples(dataset_dir_or_table)}
    be_name = getattr(be, "name", None)
    per_image, unknown, no_face = [], [], []
    files = sorted(p for p in Path(generated_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    seen = set()
    for p in files:
        key = p.name.split(".", 1)[0]
        s = samples.get(key)
        if s is None:
            unknown.append(p.name)
            continue
        if be_name and s.get("backend") and s["backend"] != be_name:
            raise ValueError(f"dataset embeddings are from {s['backend']!r}, evaluation backend is {be_name!r}")
        seen.add(key)
        faces = be.analyze([load_rgb_bytes(p.read_bytes())])[0]
        persons = [f for f in s["faces"] if f.get("refs")]  # people without a reference have nothing to compare
        gt = np.array([f["embedding"] for f in persons]).reshape(len(persons), -1)
        ref = np.array([f["refs"][0]["embedding"] for f in persons]).reshape(len(persons), -1)
        gen = np.array([np.asarray(f.embedding, dtype=np.float64) for f in faces]) if faces else np.zeros((0, gt.shape[1]))
        if not faces:
            no_face.append(key)
        m = sample_metrics(gen, gt, ref)
        m["key"] = key
        per_image.append(m)
    summary = {}
    for k in ("sim_gt", "sim_ref", "m_cp"):
        v = [m[k] for m in per_image if np.isfinite(m[k])]
        summary[k] = float(np.mean(v)) if v else float("nan")
    return {
        "summary": summary,
        "n_images": len(per_image),
        "per_image": per_image,
        "unknown_keys": unknown,
        "missing_keys": sorted(set(samples) - seen),
        "no_face": no_face,
        "distributions": {k: _quantiles([m[k] for m in per_image]) for k in ("sim_gt", "sim_ref", "m_cp")},
    }
