"""Models composed of attention and layers: encoder, classifiers."""

from efficient_transformers.models.classifier import DualEncoderClassifier, EncoderClassifier
from efficient_transformers.models.encoder import Encoder, EncoderBlock
from efficient_transformers.models.heads import ClassifierHead, pool

MODELS = {
  "classifier": EncoderClassifier,
  "dual_encoder": DualEncoderClassifier,
}

__all__ = [
  "MODELS",
  "ClassifierHead",
  "DualEncoderClassifier",
  "Encoder",
  "EncoderBlock",
  "EncoderClassifier",
  "pool",
]
