"""File a removal request: `make forget PHOTO=<image> | IMAGE=<source path or uid> | USER=<user id> |
IDENTITY=<identity id>` (python -m assets.forget --photo/--image/--user/--identity), or list the matches
awaiting review: `make forget REVIEW=1` (--review). A request is checked before it is recorded: a bad one
(empty, a missing file, a folder, a file that is not an image, no face, an image or identity the
collection does not hold) is refused with a clear error, exit status 2, and nothing is recorded. A
recorded request lives under $LINEUP_HOME/removals and is applied by the next `make run` (or
materialization of `removals`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class Refused(Exception):
    """A request that cannot be recorded; the message says why."""


def _collection_images(layout):
    """uid and source of every image row in the images table (every partition written, built or not)."""
    import pyarrow as pa

    from pipeline.storage import read_parquet

    folder = layout.table_dir("images")
    parts = [read_parquet(p, columns=["uid", "source"]) for p in sorted(folder.glob("*.parquet"))
             if not p.name.startswith(".")] if folder.exists() else []
    return pa.concat_tables(parts) if parts else pa.table({"uid": pa.array([], pa.string()), "source": pa.array([], pa.string())})


def _photo_request(settings, layout, value: str):
    from pipeline.decode import DecodeError
    from pipeline.ids import content_uid
    from pipeline.removals import embed_request_photo, record_request

    p = Path(value)
    if not p.exists():
        raise Refused(f"PHOTO={value}: no such file")
    if not p.is_file():
        raise Refused(f"PHOTO={value}: not a file (give one photo of the person)")
    data = p.read_bytes()
    from assets.faces import face_backend

    backend = face_backend(settings)
    try:
        embs = embed_request_photo(data, backend)
    except (DecodeError, OSError, ValueError) as e:
        raise Refused(f"PHOTO={value}: not an image that can be read ({type(e).__name__}: {e})") from e
    if not embs:
        raise Refused(f"no face found in {value}: use a photo where the person's face is visible")
    if len(embs) > 1:
        print(f"note: {len(embs)} faces in the photo; the largest is taken as the person", file=sys.stderr)
    return record_request(layout, "photo", content_uid(data), face_model=f"{backend.name}:{backend.model_version}",
                          embeddings=[embs[0].astype(float).tolist()])


def _image_request(layout, value: str):
    from pipeline.ids import content_uid
    from pipeline.removals import record_request, removed_uids

    p = Path(value)
    if p.is_dir():
        raise Refused(f"IMAGE={value}: a folder; give one image (its file, source path or uid)")
    if p.is_file():
        uid = content_uid(p.read_bytes())
        if uid in removed_uids(layout):
            raise Refused(f"IMAGE={value}: already removed; nothing recorded")
        return record_request(layout, "image", uid, uid=uid)  # removed whenever its bytes arrive
    uid_like = len(value) == 32 and all(c in "0123456789abcdef" for c in value)
    if uid_like and value in removed_uids(layout):
        raise Refused(f"IMAGE={value}: already removed; nothing recorded")
    images = _collection_images(layout)
    if uid_like and value in set(images.column("uid").to_pylist()):
        return record_request(layout, "image", value, uid=value)
    if value in set(images.column("source").to_pylist()):
        return record_request(layout, "image", value, source=value)
    raise Refused(f"IMAGE={value}: not a file, and no image of the collection under {layout.home} has this uid or "
                  "source name")


def _identity_request(layout, value: str):
    from pipeline.removals import record_request
    from pipeline.storage import read_parquet

    path = layout.table_file("identities")
    known = set(read_parquet(path, columns=["identity_id"]).column("identity_id").to_pylist()) if path.exists() else set()
    if value not in known:
        raise Refused(f"IDENTITY={value}: no such identity in {layout.home} (`make forget REVIEW=1` lists the "
                      "matches awaiting review with the command that confirms each)")
    return record_request(layout, "identity", value, identity_id=value)


def _check_user(layout, value: str) -> None:
    """A user request must name a user of the interaction log this home builds from (LINEUP_SOCIAL, else
    LINEUP_INPUT/social; from the environment or the settings the last run saved): one it does not know
    would remove nothing and still change the social dataset's version."""
    import os

    from pipeline.config import as_path
    from pipeline.run_settings import load_run_settings
    from pipeline.social.ingest import user_in_log

    env = {**load_run_settings(layout.home), **{k: v for k, v in os.environ.items() if k.startswith("LINEUP_")}}
    social = env.get("LINEUP_SOCIAL") or (f"{env['LINEUP_INPUT'].rstrip('/')}/social" if env.get("LINEUP_INPUT") else None)
    if not social:
        raise Refused("no interaction log is known for this home (set LINEUP_SOCIAL, or run `make run` with it "
                      "first): a USER= request is checked against the log it applies to")
    try:
        known = user_in_log(as_path(social), value)
    except FileNotFoundError as e:
        raise Refused(f"the interaction log cannot be read: {e}") from e
    if not known:
        raise Refused(f"user {value!r} appears nowhere in the interaction log at {social} (neither acting nor "
                      "creating): the request would remove nothing")


def print_review(layout) -> int:
    from pipeline.removals import review_file

    path = review_file(layout)
    rows = json.loads(path.read_text()) if path.exists() else []
    if not rows:
        print(f"no match awaits review under {layout.home}")
        return 0
    print(f"{len(rows)} face(s) near a removal request but below the automatic threshold (contact sheet under "
          f"{layout.home / 'pictures' / 'removals' / 'review'}); each line's command removes it:")
    for r in rows:
        print(f"  cosine {r['cosine']:.3f}  request {r['request']}  {r['confirm']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m assets.forget", description=__doc__)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--photo", help="a photo of the person (need not be in the collection)")
    g.add_argument("--image", help="an image: its file, its source path as ingested, or its uid")
    g.add_argument("--user", help="a social user id (removed as creator and as actor)")
    g.add_argument("--identity", help="an identity id (to confirm a match listed for review)")
    g.add_argument("--review", action="store_true", help="list the matches awaiting review, with the command for each")
    ap.add_argument("--home", help="data root (default: $LINEUP_HOME or ./data)")
    args = ap.parse_args(argv)
    import os

    if args.home:
        os.environ["LINEUP_HOME"] = str(Path(args.home).resolve())
    from assets.resources import LineupSettings
    from pipeline.removals import record_request, user_hash

    settings = LineupSettings()
    layout = settings.layout
    if args.review:
        return print_review(layout)
    kind, value = next((k, v) for k, v in (("PHOTO", args.photo), ("IMAGE", args.image), ("USER", args.user),
                                           ("IDENTITY", args.identity)) if v is not None)
    value = value.strip()
    try:
        if not value:
            raise Refused(f"{kind}= is empty: say which {kind.lower()} to remove")
        if kind == "PHOTO":
            req = _photo_request(settings, layout, value)
        elif kind == "IMAGE":
            req = _image_request(layout, value)
        elif kind == "USER":
            _check_user(layout, value)
            req = record_request(layout, "user", value, user_hash=user_hash(value))
        else:
            req = _identity_request(layout, value)
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"recorded removal request {req.id} ({req.kind}) under {layout.home / 'removals'}; "
          "the next `make run` applies it (PURGE=1 also deletes the dataset versions that contained it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
