"""Models composed of attention, memory and layers: encoder, classifiers, decoder LM."""

from efficient_transformers.models.classifier import DualEncoderClassifier, EncoderClassifier
from efficient_transformers.models.decoder import DecoderLM
from efficient_transformers.models.encoder import Encoder, EncoderBlock
from efficient_transformers.models.heads import ClassifierHead, pool
from efficient_transformers.models.segmented import SegmentedClassifier

MODELS = {
  "classifier": EncoderClassifier,
  "dual_encoder": DualEncoderClassifier,
  "decoder_lm": DecoderLM,
  "segmented": SegmentedClassifier,
}

__all__ = [
  "MODELS",
  "ClassifierHead",
  "DecoderLM",
  "DualEncoderClassifier",
  "Encoder",
  "EncoderBlock",
  "EncoderClassifier",
  "SegmentedClassifier",
  "pool",
]
