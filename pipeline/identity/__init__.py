"""Identity index: kNN graph over face embeddings -> training-free clustering -> stable identity ids.

Entry point for the ``identities`` asset: :func:`build_identities` (pipeline/identity/build.py).

Modules: ``knn`` (FAISS / torch kNN graph), ``cluster`` (Chinese whispers, Leiden, Infomap,
connected components; default thresholds per embedding backend), ``metrics`` (pairwise/BCubed
P/R/F, NMI), ``stable_ids`` (incremental assignment, sparse id mapping, churn), ``synth``
(synthetic mixtures fitted to dlib statistics), ``knn_torch`` (GPU kNN), ``report`` (label-based
evaluation and the UI's pictures).
"""

from .build import IdentityResult, build_identities
from .cluster import DEFAULT_METHOD, DEFAULT_THRESHOLDS, cluster_graph, default_threshold
from .knn import KnnGraph, knn_graph
from .metrics import evaluate

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_THRESHOLDS",
    "IdentityResult",
    "KnnGraph",
    "build_identities",
    "cluster_graph",
    "default_threshold",
    "evaluate",
    "knn_graph",
]
