"""Tiny contract-conforming shards for tests, smoke runs and the CPU bench (plain ``tarfile``).

The images are synthetic on purpose: a *learnable* preference (winners are one colour) and faces
that are coloured discs at known boxes/landmarks. Nothing here claims realism.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _jpg(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def write_dataset(out_dir: str | Path, dataset: str, samples: list[dict], per_shard: int = 8,
                  prefix: str = "data", config: dict | None = None) -> Path:
    """``samples``: dicts with ``__key__`` and ext -> bytes. Writes tars + manifest.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for si in range(0, len(samples), per_shard):
        name = f"{prefix}-{si // per_shard:06d}.tar"
        with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as tf:
            for s in samples[si:si + per_shard]:
                for ext in sorted(k for k in s if not k.startswith("__")):
                    _add(tf, f"{s['__key__']}.{ext}", s[ext])
        data = (out / name).read_bytes()
        shards.append({"name": name, "samples": len(samples[si:si + per_shard]), "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})
    cfg = config or {"synthetic": True, "dataset": dataset}
    manifest = {
        "dataset": dataset, "version": out.name,
        "config": cfg,
        "config_fingerprint": hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16],
        "num_samples": len(samples), "shards": shards,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out


def preference_samples(n: int, size: int = 32, seed: int = 0, ties: int = 0, shuffled_labels: bool = False) -> list[dict]:
    """Winners are reddish, losers bluish (with noise); the winner's position (0/1) is random. With
    ``shuffled_labels`` the label is a coin flip independent of the images: nothing is learnable."""
    rng = np.random.default_rng(seed)
    out = []
    words = ["a", "photo", "of", "cat", "dog", "tree", "house", "car"]
    for i in range(n + ties):
        noise = lambda: rng.normal(0, 20, (size, size, 3))
        red = np.clip(np.array([200, 40, 40]) + noise(), 0, 255)
        blue = np.clip(np.array([40, 40, 200]) + noise(), 0, 255)
        win_first = bool(rng.integers(0, 2))
        img0, img1 = (red, blue) if win_first else (blue, red)
        if shuffled_labels:
            win_first = bool(rng.integers(0, 2))
        tie = i >= n
        meta = {
            "caption": " ".join(rng.choice(words, size=4)),
            "label_0": 1 if (win_first or tie) else 0,
            "label_1": 1 if (not win_first or tie) else 0,
            "user_id": f"u{i % 3}",
            "evidence": {"synthetic": True},
        }
        out.append({"__key__": f"pair{i:05d}", "0.jpg": _jpg(img0), "1.jpg": _jpg(img1),
                    "json": json.dumps(meta).encode()})
    return out


def _face_image(size: int, boxes: list[tuple[float, float, float, float]], colours, rng) -> np.ndarray:
    im = Image.fromarray(np.clip(rng.normal(128, 30, (size, size, 3)), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for (x1, y1, x2, y2), c in zip(boxes, colours):
        d.ellipse([x1, y1, x2, y2], fill=tuple(int(v) for v in c))
        w, h = x2 - x1, y2 - y1
        for ex in (0.35, 0.65):  # "eyes"
            d.ellipse([x1 + ex * w - 2, y1 + 0.4 * h - 2, x1 + ex * w + 2, y1 + 0.4 * h + 2], fill=(0, 0, 0))
    return np.asarray(im)


def landmarks_for(box) -> list[list[float]]:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    rel = [(0.34, 0.46), (0.66, 0.46), (0.5, 0.64), (0.37, 0.82), (0.63, 0.82)]
    return [[x1 + a * w, y1 + b * h] for a, b in rel]


def identity_samples(n: int, size: int = 64, faces_per_image: int = 2, n_identities: int = 6,
                     emb_dim: int = 16, seed: int = 0) -> list[dict]:
    """Target images with ``faces_per_image`` discs (colour = identity), one ref crop per face."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(30, 225, (n_identities, 3))
    id_emb = rng.normal(size=(n_identities, emb_dim))
    id_emb /= np.linalg.norm(id_emb, axis=1, keepdims=True)
    out = []
    for i in range(n):
        ids = rng.choice(n_identities, size=faces_per_image, replace=False)
        boxes = []
        w = size / faces_per_image
        for j in range(faces_per_image):
            x1 = j * w + w * 0.1
            boxes.append((x1, size * 0.25, x1 + w * 0.8, size * 0.25 + w * 0.8))
        target = _face_image(size, boxes, palette[ids], rng)
        sample = {"__key__": f"img{i:05d}", "target.jpg": _jpg(target)}
        faces = []
        for j, ident in enumerate(ids):
            ref = _face_image(48, [(4, 4, 44, 44)], [palette[ident]], rng)
            member = f"ref_{j}.jpg"
            sample[member] = _jpg(ref)
            e = id_emb[ident] + rng.normal(0, 0.05, emb_dim)
            e /= np.linalg.norm(e)
            faces.append({
                "bbox": [float(v) for v in boxes[j]], "landmarks": landmarks_for(boxes[j]),
                "identity_id": f"id{ident}", "embedding": e.tolist(),
                "refs": [{"member": member, "uid": f"uid{i}_{j}", "similarity": 0.7, "kind": "image",
                          "bbox": [4.0, 4.0, 44.0, 44.0], "landmarks": landmarks_for((4, 4, 44, 44))}],
            })
        sample["json"] = json.dumps({"split": "train", "faces": faces, "caption": "two people"}).encode()
        out.append(sample)
    return out
