"""The fixed task of emotion-bench: labels, corpora, synthetic data, features and the model zoo.

Knows nothing of parallelism strategies.
"""
from .audio import FeatureConfig
from .dataset import Dataset, load_folder, load_synthetic
from .labels import CLASSES
from .models import MODELS, BlockModel, build_model, feature_kind

__all__ = ["CLASSES", "MODELS", "BlockModel", "Dataset", "FeatureConfig", "build_model", "feature_kind",
           "load_folder", "load_synthetic"]
