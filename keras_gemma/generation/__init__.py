"""Text generation: samplers, the decode engine and its per-backend compilation."""

from keras_gemma.generation import samplers
from keras_gemma.generation.api import GenerationMixin
