"""Build the demo input collection from real photos that packages on the registries ship.

Sources (pinned versions, verified by sha256):
- PyPI `face_recognition==1.3.0` source distribution: tests/test_images/ (Barack Obama x3 plus two
  partial crops of one of them, Joe Biden): loose files in the input folder.
- PyPI `insightface==2.1` wheel: insightface/data/images/t1.jpg (a group photo, the cast of
  Friends) and Tom_Hanks_54745.png: listed in a Parquet manifest.
- npm `@vladmandic/face-api@1.7.15`: demo/sample1..6.jpg (group photos of friends who recur
  across photos): packed into a WebDataset tar shard with json captions.
A simulated interaction log (pipeline/social/simulate.py) goes to social/ for the preference pairs.
Plus three deliberately bad files (text named .jpg, a truncated JPEG, an empty file) so the
demo shows the rejects table at work. Photos are downloaded by the ordinary package clients
(pip, npm) into a temporary folder; nothing is fetched from a model hub.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PACKAGES = {
    "face_recognition": ("face_recognition-1.3.0.tar.gz", "5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec"),
    "insightface": ("insightface-2.1-py3-none-any.whl", "dcd58ee79d99d689572477315f3149353afd65a36dc575f597cbb217a7bde399"),
    "face-api": ("vladmandic-face-api-1.7.15.tgz", "0d77fffeef362ef9c0939cf6c567f3a2e8e177f114fa257a3270cbd2e509b031"),
}
CAPTIONS = {
    "sample1": "three friends posing indoors at night",
    "sample2": "three friends sitting on a sofa",
    "sample3": "three friends at a bar",
    "sample4": "four friends posing in front of a purple wall",
    "sample5": "five friends on a staircase",
    "sample6": "four friends in front of a window",
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fetch(cache: Path) -> dict[str, Path]:
    cache.mkdir(parents=True, exist_ok=True)
    got = {}
    for name, (fname, sha) in PACKAGES.items():
        target = cache / fname
        if not target.exists():
            tmp = Path(tempfile.mkdtemp(dir=cache))
            if name == "face_recognition":
                cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "face_recognition==1.3.0", "-d", str(tmp)]
            elif name == "insightface":
                cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", "insightface==2.1", "-d", str(tmp)]
            else:
                npm = shutil.which("npm")
                if not npm:
                    print("warning: npm not found; the demo goes on without the @vladmandic/face-api photos", file=sys.stderr)
                    shutil.rmtree(tmp)
                    continue
                cmd = [npm, "pack", "--silent", "@vladmandic/face-api@1.7.15", "--pack-destination", str(tmp)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            (tmp / fname).replace(target)
            shutil.rmtree(tmp)
        if _sha(target) != sha:
            raise SystemExit(f"{target}: sha256 {_sha(target)} does not match the pinned {sha}")
        got[name] = target
    return got


def build(out: Path, cache: Path) -> None:
    # images that the Parquet manifest points at live outside the input folder; the manifest names them
    # relative to itself, so the rows (and the dataset version ids) do not depend on where the demo lives
    pkgs = _fetch(cache)
    if out.exists():
        shutil.rmtree(out)
    (out / "portraits").mkdir(parents=True)
    if "face_recognition" in pkgs:
        with tarfile.open(pkgs["face_recognition"]) as tf:
            for m in tf.getmembers():
                p = Path(m.name)
                if p.parent.name == "test_images" and p.suffix == ".jpg" and m.isfile():
                    (out / "portraits" / p.name).write_bytes(tf.extractfile(m).read())
    if "insightface" in pkgs:
        (out / "manifests").mkdir(parents=True)
        image_dir = cache / "insightface_images"
        image_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        with zipfile.ZipFile(pkgs["insightface"]) as zf:
            for name, caption in (("t1.jpg", "six friends around a poker table"), ("Tom_Hanks_54745.png", "a portrait")):
                data = zf.read(f"insightface/data/images/{name}")
                (image_dir / name).write_bytes(data)
                rows.append({"path": os.path.relpath(image_dir / name, out / "manifests"), "caption": caption, "url": f"pypi:insightface==2.1/insightface/data/images/{name}"})
        pq.write_table(pa.Table.from_pylist(rows), out / "manifests" / "insightface.parquet")
    if "face-api" in pkgs:
        (out / "shards").mkdir()
        with tarfile.open(pkgs["face-api"]) as src, tarfile.open(out / "shards" / "face-api-000000.tar", "w") as dst:
            for stem in sorted(CAPTIONS):
                data = src.extractfile(f"package/demo/{stem}.jpg").read()
                meta = json.dumps({"caption": CAPTIONS[stem], "url": f"npm:@vladmandic/face-api@1.7.15/demo/{stem}.jpg"}).encode()
                for ext, payload in (("jpg", data), ("json", meta)):
                    info = tarfile.TarInfo(f"{stem}.{ext}")
                    info.size = len(payload)
                    dst.addfile(info, io.BytesIO(payload))
    bad = out / "bad"
    bad.mkdir()
    (bad / "notes_named_like_a_photo.jpg").write_text("this is a text file, not a photo\n")
    (bad / "empty.jpg").write_bytes(b"")
    some = next((out / "portraits").glob("*.jpg"), None)
    if some is not None:
        data = some.read_bytes()
        (bad / "truncated.jpg").write_bytes(data[: len(data) // 3])
    # the interaction log: simulated (a community with known image quality and user taste), with one
    # bad row for every reject reason; its ground truth stays outside the input folder
    from pipeline.social.simulate import SimConfig, simulate

    simulate(out / "social", truth_dir=cache / "social_truth", config=SimConfig(n_events=300_000, inject_bad=1))
    n = sum(1 for p in out.rglob("*") if p.is_file())
    print(f"demo input: {n} files in {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data/demo/input"))
    ap.add_argument("--cache", type=Path, default=Path("data/demo/cache"))
    args = ap.parse_args()
    build(args.out.resolve(), args.cache.resolve())


if __name__ == "__main__":
    main()
