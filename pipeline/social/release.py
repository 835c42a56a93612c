"""A released social preference dataset version: its content id and its card."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline import __version__
from pipeline.datasets import DatasetCard, removal_text, removals_section, version_id
from pipeline.shards import file_sha256
from pipeline.social.config import SocialConfig
from pipeline.social.ingest import _read_table, find_inputs

BUILDER_VERSION = "social-builder-2"


def social_version(social_dir: Path, config: SocialConfig, removals: list[dict] | None = None,
                   digest_cache: Path | None = None) -> tuple[str, dict]:
    """The id hashes the log tables' bytes (images.* and events*.*), the image files they name (by the
    path the log writes and the sha256 of their bytes), the config, the user removals in force and the
    builder's version: the same log and photos give the same id wherever they are copied to.

    ``digest_cache`` (a local JSON file): image digests keyed by (absolute path, size, mtime), so that an
    unchanged file is not read again on every run; a stale or unreadable cache only costs re-reading."""
    social_dir = Path(social_dir)
    image_files, event_files = find_inputs(social_dir)
    cache = _load_digests(digest_cache)
    fresh: dict[str, list] = {}
    referenced = []
    for f in image_files:
        t = _read_table(f)
        if "path" in t.column_names:
            for p in t.column("path").to_pylist():
                q = Path(p) if p else None
                if q is not None and not q.is_absolute():
                    q = social_dir / q
                st = q.stat() if q is not None and q.is_file() else None
                digest = None
                if st is not None:
                    key = str(q.resolve())
                    hit = cache.get(key)
                    if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                        digest = hit[2]
                    else:
                        try:
                            digest = file_sha256(q)
                        except OSError:
                            digest = None  # unreadable now: the build rejects it ("unreadable image")
                    if digest is not None:
                        fresh[key] = [st.st_size, st.st_mtime_ns, digest]
                referenced.append((str(p), st.st_size if st else None, digest))
    if digest_cache is not None and fresh != {k: cache.get(k) for k in fresh}:
        _save_digests(digest_cache, {**cache, **fresh})
    parts = {
        "builder": BUILDER_VERSION,
        "library": __version__,
        "config": config.to_dict(),
        "log_files": [(f.name, file_sha256(f)) for f in [*image_files, *event_files]],
        "image_files": hashlib.sha256(json.dumps(sorted(referenced, key=str)).encode()).hexdigest()[:32],
        "removals": sorted(e["request"] for e in removals or []),
    }
    return version_id(parts), parts


def _load_digests(path: Path | None) -> dict[str, list]:
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_digests(path: Path, digests: dict[str, list]) -> None:
    from pipeline.storage import write_bytes_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(json.dumps(digests, sort_keys=True).encode(), Path(path))


def social_card(version: str, folder: Path, stats: dict, config: SocialConfig, parts: dict, contact: str,
                removals: list[dict] | None = None) -> DatasetCard:
    def n(sub):
        p = Path(folder) / sub / "manifest.json"
        return json.loads(p.read_text())["num_samples"] if p.exists() else 0

    splits = {"webdataset/train": n("webdataset/train"), "webdataset/eval": n("webdataset/eval"),
              "per_user/webdataset/train": n("per_user/webdataset/train"), "per_user/webdataset/eval": n("per_user/webdataset/eval")}
    filters = [{"filter": f"pairs dropped: {k.removeprefix('pairs_dropped_').replace('_', ' ')}", "threshold": "",
                "removed": v} for k, v in sorted(stats.items()) if k.startswith("pairs_dropped")]
    filters += [
        {"filter": "events rejected (malformed rows)", "threshold": "", "removed": stats.get("events_rejected", "")},
        {"filter": "events by flagged bots", "threshold": "rate rules, remix rings, boosters", "removed": stats.get("events_bot_excluded", "")},
        {"filter": "self-engagement of creators", "threshold": "", "removed": stats.get("events_self_excluded", "")},
        {"filter": "population pairs: posterior expected FDR per prompt group", "threshold": f"<= {stats.get('fdr_level', '')}",
         "removed": ""},
    ]
    def est(prefix):
        v, iv = stats.get(f"{prefix}estimated_precision"), stats.get(f"{prefix}estimated_precision_interval")
        return "empty (no pairs)" if v is None else f"{v:.3f} (95% interval {iv[0]:.3f}-{iv[1]:.3f})"

    y = stats.get("yield_vs_naive")
    cal = stats.get("calibration") or {}
    quality = (
        f"Estimated from the log alone (no labels): population pairs' precision {est('')}, per-user pairs' "
        f"{est('user_')}; yield {'-' if y is None else f'{y:.2f}'}x the naive rule's pairs "
        f"({stats.get('naive_pairs', '-')} naive pairs: more raw remixes, then likes, wins). Test: "
        f"{stats.get('test', '')}; split-half dispersion {cal.get('phi', '-')} (1 = Poisson; the posterior is "
        f"never narrower than Poisson). How well such estimates track the truth on simulated logs: docs/benchmarks.md, social sweep."
    )
    return DatasetCard(
        name="social",
        version=version,
        summary=("Implicit social-feedback preference pairs (after Social Reward): within a prompt, image A is preferred "
                 "over image B when its engagement, measured against what its audience predicts, is reliably higher. "
                 "Population pairs (the default exports, Pick-a-Pic compatible) and per-user pairs (per_user/)."),
        splits=splits,
        sample_format=("`<pair_id>.0.jpg`, `<pair_id>.1.jpg`, `<pair_id>.json` (caption = the prompt both images answer, "
                       "label_0/label_1 with 1 = preferred, user_id, uids, evidence); Pick-a-Pic v2 Parquet under "
                       "pickapic/ and per_user/pickapic/ (train-*, validation-*)."),
        sources=[f"interaction log files: {', '.join(name for name, _ in parts['log_files'])}"],
        licenses=[("Images and prompts: the licence of the platform's content (unknown to lineup). The log describes "
                   "real users' behaviour: see 'Removal requests'."), "Code: Apache-2.0 (lineup)."],
        filters=filters,
        models=[
            (
                "none (counts, Gamma-Poisson posteriors per taste group of users, a rank-2 SVD for the groups; "
                "no learned model)"
            )
        ],
        limitations=[
            (
                "Engagement is a proxy for preference. Images that polarise their audience are compared within groups "
                "of users of one taste, which removes most of their advantage on the simulator (docs/benchmarks.md, social sweep)."
            ),
            "The engagement weights are tuned on the simulator: re-tune them on your platform's logs.",
            (
                "Per-user pairs rest on one session of one user each; they are kept only where users of the same "
                "taste support the order (posterior >= user_min_support), and their estimated precision is that "
                "support's mean."
            ),
            (
                "The precision estimates assume what the log shows: a bias shared by every taste group (e.g. "
                "undetected bots) is invisible to them."
            ),
        ],
        removal=removal_text(contact),
        lineage={"version": version, **parts},
        tags=["preference", "dpo", "pick-a-pic", "webdataset"],
        extra_sections={"Estimated quality": quality, "Removals applied": removals_section(removals)},
    )
