"""Models composed of attention, memory and layers: encoder, classifiers, decoder LM."""

from efficient_transformers.models.classifier import DualEncoderClassifier, EncoderClassifier
from efficient_transformers.models.decoder import DecoderLM
from efficient_transformers.models.encoder import Encoder, EncoderBlock
from efficient_transformers.models.heads import ClassifierHead, pool
from efficient_transformers.models.pretrain import TokenPredictor
from efficient_transformers.models.recurrent import (
  CompressiveTransformer,
  RecurrentMemoryTransformer,
  TransformerXL,
)
from efficient_transformers.models.segmented import SegmentedClassifier
from efficient_transformers.models.stack import Block, Stack

MODELS = {
  "classifier": EncoderClassifier,
  "dual_encoder": DualEncoderClassifier,
  "decoder_lm": DecoderLM,
  "segmented": SegmentedClassifier,
  "token_predictor": TokenPredictor,
}

__all__ = [
  "MODELS",
  "Block",
  "ClassifierHead",
  "CompressiveTransformer",
  "DecoderLM",
  "DualEncoderClassifier",
  "Encoder",
  "EncoderBlock",
  "EncoderClassifier",
  "RecurrentMemoryTransformer",
  "SegmentedClassifier",
  "Stack",
  "TokenPredictor",
  "TransformerXL",
  "pool",
]
