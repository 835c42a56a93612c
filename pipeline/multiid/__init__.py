"""Multi-identity paired dataset (MultiID-2M style, after WithAnyone): reference selection with a
copy-paste guard, identity-disjoint splits, WebDataset shards, MultiID-Bench metrics.

Entry point: :func:`build_multiid_dataset`.
"""

from pipeline.faces.calibration import calibrate_thresholds, match_quantile
from pipeline.multiid.build import (
    MultiIDResult,
    build_multiid_dataset,
    reader_from_images,
    select_references,
)
from pipeline.multiid.config import BACKEND_THRESHOLDS, MultiIDConfig, thresholds_for
from pipeline.multiid.metrics import (
    copy_paste,
    dataset_quality_stats,
    evaluate_folder,
    hungarian_match,
    sample_metrics,
)
from pipeline.multiid.rows import hf_features
from pipeline.multiid.splits import check_identity_disjoint, identity_split

__all__ = [
    "BACKEND_THRESHOLDS", "MultiIDConfig", "MultiIDResult", "build_multiid_dataset", "calibrate_thresholds",
    "check_identity_disjoint", "copy_paste", "dataset_quality_stats", "evaluate_folder", "hf_features", "hungarian_match",
    "identity_split", "match_quantile", "reader_from_images", "sample_metrics", "select_references", "thresholds_for",
]
