"""Gemma open language models for Keras 3."""

from keras_gemma.backbone import GemmaBackbone
from keras_gemma.causal_lm import GemmaCausalLM
from keras_gemma.chat_template import apply_chat_template
from keras_gemma.config import GLOBAL, LOCAL, GemmaConfig, layer_pattern
from keras_gemma.generation import samplers
from keras_gemma.distillation import Distiller
from keras_gemma.merge import merge
from keras_gemma.preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.precision import get_float32_matmul_precision, set_float32_matmul_precision
from keras_gemma.presets import get_preset, list_presets
from keras_gemma.tokenizer import GemmaTokenizer

__version__ = "0.1.0"
