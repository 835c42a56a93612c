"""Configuration of the multi-identity (MultiID-2M style) builder.

Similarity thresholds belong to the face backend (WithAnyone's 0.6 / 0.8 are ArcFace cosines): the
defaults come from :data:`pipeline.faces.calibration.BACKEND_THRESHOLDS` (``same_person_min`` and
``same_shot_min``), where they are documented with their calibration.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from pipeline.faces.calibration import BACKEND_THRESHOLDS, thresholds_for  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class MultiIDConfig:
    backend: str = "dlib"
    # targets
    min_faces: int = 1
    max_faces: int = 5
    min_face_px: float = 100.0  # usable face: box >= this on each side
    det_score_min: float | None = None  # None: the backend's value
    blur_min: float | None = None  # None: the backend's value
    # a target is kept when at least min_referenced_persons of its people got a reference; the others stay
    # in the sample with no reference (the identity loader masks them); require_all_refs drops such targets
    require_all_refs: bool = False
    min_referenced_persons: int = 1
    # references
    refs_per_person: int = 2
    # per person of a target, at most this many of the identity's other faces are examined (chosen by a
    # hash of (target, candidate), so each target sees a different, reproducible subset): the work per
    # target stays bounded however many photos a person has; the rest is counted as not examined
    max_candidates_per_person: int = 200
    # LRU bounds of the copy-paste guard's caches (images' hashes and fingerprints; faces' keypoints)
    cache_images: int = 20_000
    cache_keypoints: int = 2_000
    ref_min_face_px: float | None = None  # None: same as min_face_px
    sim_low: float | None = None  # None: the backend's calibrated value
    sim_high: float | None = None
    # copy-paste guard (perceptual hashes; see dedup.py)
    image_hamming_max: int = 6
    face_hamming_max: int = 6
    face_ncc_min: float = 0.96
    # geometric same-shot check (SIFT + RANSAC similarity on the regions around the faces; dedup.py):
    # same shot when inliers >= kp_min_inliers and inliers / matches >= kp_min_ratio, or inliers >=
    # kp_strong_inliers. Calibrated on shared/data/faces (bench/bench_multiid.py --keypoints).
    keypoints: bool = True
    kp_min_inliers: int = 10
    kp_min_ratio: float = 0.8
    kp_strong_inliers: int = 30
    # the guard's costly checks (face NCC, keypoints) run on the ranked candidates in rank order until
    # refs_per_person are chosen (~1 s of CPU a target less at 1M faces; the same references either way);
    # the candidates ranked below are recorded "not_examined_enough_chosen". True: run the whole guard on
    # every candidate (the candidates table then records every candidate's measurements and final filter)
    examine_all_candidates: bool = False
    # ranking of surviving candidates: w_pose * pose difference + w_quality * quality + w_sim * mid-band
    w_pose: float = 0.5
    w_quality: float = 0.3
    w_sim: float = 0.2
    pose_norm_deg: float = 45.0
    # splits
    eval_fraction: float = 0.1
    split_salt: str = "multiid-v1"
    straddle_rule: str = "drop"  # a target whose people are in both splits: "drop" (counted)
    # shards
    ref_mode: str = "crop"  # "crop": face crop of the reference (JPEG); "image": original reference bytes
    crop_margin: float = 0.6  # crop = bbox grown by this fraction of its size on each side, squared
    crop_max_side: int = 512
    jpeg_quality: int = 95
    shard_max_count: int = 10_000
    shard_max_bytes: int = 1_000_000_000
    dataset_name: str = "multiid"
    # shard reuse across versions: every co-occurrence component (people linked by sharing photos) goes to
    # bucket hash(its smallest identity id) % reuse_buckets, and each bucket has its own shards. A new
    # version re-selects only the buckets whose inputs changed and hard-links the others' shards. Fixed
    # (not derived from the collection's size) so that a bucket keeps its components as the collection
    # grows; changing it changes every bucket, hence a full rebuild. More buckets: finer reuse, more files.
    reuse_buckets: int = 64
    extra: dict = field(default_factory=dict)

    def resolved(self) -> MultiIDConfig:
        """A copy with backend defaults filled in (what the manifest records)."""
        t = thresholds_for(self.backend)
        from dataclasses import replace

        return replace(
            self,
            det_score_min=t.det_score_min if self.det_score_min is None else self.det_score_min,
            blur_min=t.blur_min if self.blur_min is None else self.blur_min,
            ref_min_face_px=self.min_face_px if self.ref_min_face_px is None else self.ref_min_face_px,
            sim_low=t.same_person_min if self.sim_low is None else self.sim_low,
            sim_high=t.same_shot_min if self.sim_high is None else self.sim_high,
        )

    def validate(self) -> None:
        c = self.resolved()
        if not (1 <= c.min_faces <= c.max_faces):
            raise ValueError("need 1 <= min_faces <= max_faces")
        if not (-1.0 <= c.sim_low < c.sim_high <= 1.0):
            raise ValueError(f"need -1 <= sim_low < sim_high <= 1, got {c.sim_low}, {c.sim_high}")
        if not (0.0 <= c.eval_fraction <= 1.0):
            raise ValueError("eval_fraction must be in [0, 1]")
        if c.straddle_rule != "drop":
            raise ValueError("straddle_rule: only 'drop' is implemented")
        if c.ref_mode not in ("crop", "image"):
            raise ValueError("ref_mode must be 'crop' or 'image'")
        if c.kp_min_inliers < 3 or c.kp_strong_inliers < c.kp_min_inliers or not (0.0 <= c.kp_min_ratio <= 1.0):
            raise ValueError("need 3 <= kp_min_inliers <= kp_strong_inliers and 0 <= kp_min_ratio <= 1")
        if c.reuse_buckets < 1:
            raise ValueError("reuse_buckets must be >= 1")
        if c.refs_per_person < 1:
            raise ValueError("refs_per_person must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)
