"""Evaluation: FID/KID (TF-Inception), CLIP score, colour and shape agreement, diversity, VAE reconstruction.

Run ``python -m pokediff.eval --model PATH``; the pieces are importable for notebooks and benchmarks.
"""

from .color import agreement_from_predictions, color_agreement, color_histogram, color_in_text, dominant_color
from .diversity import grouped_diversity, mean_pairwise_distance
from .fid import PrecomputedFeatures, extract_features, frechet_distance, kernel_inception_distance
from .inception import (
    FEATURE_NETS,
    InceptionFeatureExtractor,
    PixelFeatures,
    inception_preprocess,
    load_feature_net,
    load_inception,
)
from .reconstruction import psnr, reconstruction_metrics
from .reference_stats import ReferenceFeatures, dataset_fingerprint, default_cache_dir, reference_features
from .runner import METRIC_KEYS, RESULT_KEYS, EvalSettings, evaluate, save_grid, validate_result, write_result
from .sampling import load_sampler
from .shape import (
    SHAPE_GROUPS,
    ShapeJudge,
    fit_shape_judge,
    shape_agreement,
    shape_agreement_from_predictions,
    shape_group,
    shape_in_text,
    shape_judge_for,
    silhouette_features,
)

__all__ = [
    "EvalSettings",
    "FEATURE_NETS",
    "InceptionFeatureExtractor",
    "PixelFeatures",
    "load_feature_net",
    "METRIC_KEYS",
    "PrecomputedFeatures",
    "RESULT_KEYS",
    "ReferenceFeatures",
    "agreement_from_predictions",
    "color_agreement",
    "color_histogram",
    "color_in_text",
    "dataset_fingerprint",
    "default_cache_dir",
    "dominant_color",
    "evaluate",
    "extract_features",
    "frechet_distance",
    "grouped_diversity",
    "inception_preprocess",
    "kernel_inception_distance",
    "load_inception",
    "load_sampler",
    "mean_pairwise_distance",
    "psnr",
    "reconstruction_metrics",
    "reference_features",
    "save_grid",
    "SHAPE_GROUPS",
    "ShapeJudge",
    "fit_shape_judge",
    "shape_agreement",
    "shape_agreement_from_predictions",
    "shape_group",
    "shape_in_text",
    "shape_judge_for",
    "silhouette_features",
    "validate_result",
    "write_result",
]
