"""Candidate scoring shared by every dataset: identity similarity, face quality, CLIP, aesthetics, social reward.

scores, report = score_candidates([(uid, rgb, caption), ...], faces_table, ScoringConfig(...))
order = rank_candidates(scores, {"clip_score": 1.0, "face_quality": 0.5})
"""

from pipeline.faces.quality import QualityConfig, face_quality, face_quality_from_table, quality_components
from pipeline.scoring.base import ScorerUnavailable
from pipeline.scoring.clip import ClipConfig, ClipEncoder, clip_scores
from pipeline.scoring.heads import (
    AestheticScorer,
    HeadConfig,
    linear_stack_from_state_dict,
)
from pipeline.scoring.social import SocialRewardScorer
from pipeline.scoring.stage import (
    SCORE_COLUMNS,
    SCORES_SCHEMA,
    ScoringConfig,
    combine_scores,
    rank_candidates,
    score_candidates,
)

__all__ = [
    "SCORES_SCHEMA",
    "SCORE_COLUMNS",
    "AestheticScorer",
    "ClipConfig",
    "ClipEncoder",
    "HeadConfig",
    "QualityConfig",
    "ScorerUnavailable",
    "ScoringConfig",
    "SocialRewardScorer",
    "clip_scores",
    "combine_scores",
    "face_quality",
    "face_quality_from_table",
    "linear_stack_from_state_dict",
    "quality_components",
    "rank_candidates",
    "score_candidates",
]
