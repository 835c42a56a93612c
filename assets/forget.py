"""File a removal request: `make forget PHOTO=<image> | IMAGE=<source path or uid> | USER=<user id> |
IDENTITY=<identity id>` (python -m assets.forget --photo/--image/--user/--identity). The request is recorded
under $LINEUP_HOME/removals and applied by the next `make run` (or materialization of `removals`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m assets.forget", description=__doc__)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--photo", help="a photo of the person (need not be in the collection)")
    g.add_argument("--image", help="an image: its source path (as ingested or on disk) or its uid")
    g.add_argument("--user", help="a social user id (removed as creator and as actor)")
    g.add_argument("--identity", help="an identity id (to confirm a match listed for review)")
    ap.add_argument("--home", help="data root (default: $LINEUP_HOME or ./data)")
    args = ap.parse_args(argv)
    import os

    if args.home:
        os.environ["LINEUP_HOME"] = str(Path(args.home).resolve())
    from assets.resources import LineupSettings
    from pipeline.ids import content_uid
    from pipeline.removals import embed_request_photo, record_request, user_hash

    settings = LineupSettings()
    layout = settings.layout
    if args.photo:
        from assets.faces import face_backend

        data = Path(args.photo).read_bytes()
        backend = face_backend(settings)
        embs = embed_request_photo(data, backend)
        if not embs:
            print(f"error: no face found in {args.photo}: use a photo where the person's face is visible", file=sys.stderr)
            return 2
        if len(embs) > 1:
            print(f"note: {len(embs)} faces in the photo; the largest is taken as the person", file=sys.stderr)
        req = record_request(layout, "photo", content_uid(data), face_model=f"{backend.name}:{backend.model_version}",
                             embeddings=[embs[0].astype(float).tolist()])
    elif args.image:
        p = Path(args.image)
        if p.is_file():
            req = record_request(layout, "image", content_uid(p.read_bytes()), uid=content_uid(p.read_bytes()))
        elif len(args.image) == 32 and all(c in "0123456789abcdef" for c in args.image):
            req = record_request(layout, "image", args.image, uid=args.image)
        else:
            req = record_request(layout, "image", args.image, source=args.image)
    elif args.user:
        req = record_request(layout, "user", args.user, user_hash=user_hash(args.user))
    else:
        req = record_request(layout, "identity", args.identity, identity_id=args.identity)
    print(f"recorded removal request {req.id} ({req.kind}) under {layout.home / 'removals'}; "
          "the next `make run` applies it (PURGE=1 also deletes the dataset versions that contained it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
