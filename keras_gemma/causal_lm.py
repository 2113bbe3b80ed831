"""`GemmaCausalLM`: the backbone plus the tied output head."""

import keras
from keras import ops

from keras_gemma import precision, quantization
from keras_gemma.backbone import GemmaBackbone
from keras_gemma.checkpoints import preset
from keras_gemma.generation import GenerationMixin
from keras_gemma.layers import soft_cap
from keras_gemma.preprocessor import GemmaCausalLMPreprocessor


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaCausalLM(GenerationMixin, keras.Model):
    """A Gemma language model: logits over the vocabulary for every position.

    Args:
        backbone: a `GemmaBackbone`.
        preprocessor: an optional `GemmaCausalLMPreprocessor`, used by `fit`
            on raw text and by `generate`.

    Example:
    ```python
    lm = keras_gemma.GemmaCausalLM(backbone)
    logits = lm({"token_ids": ids, "padding_mask": mask})  # (b, t, vocab)
    # With a preprocessor: generate, chat, stream and score (generation/api.py).
    lm.generate(["Hello", "The sky is"], max_new_tokens=16)
    lm.chat([{"role": "user", "content": "Hi!"}])
    ```
    """

    # The classes `from_preset` builds (keras-hub's names).
    backbone_cls = GemmaBackbone
    preprocessor_cls = GemmaCausalLMPreprocessor

    def __init__(self, backbone, preprocessor=None, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.built = True

    @property
    def config(self):
        return self.backbone.config

    def call(self, inputs, training=None):
        hidden = self.backbone(inputs, training=training)
        return self.logits(hidden)

    def logits(self, hidden):
        """Output logits (b, t, vocab) in float32 from hidden states (b, t, d)."""
        with precision.matmul_precision(self.backbone.compute_dtype):
            logits = self.backbone.token_embedding.reverse(hidden)
        return soft_cap(ops.cast(logits, "float32"), self.config.final_logit_softcap)

    def decode_logits(self, hidden):
        """A decode step's logits (b, vocab), float32, from hidden (b, 1, d)."""
        return self.logits(hidden)[:, 0, :]

    def fit(self, x=None, y=None, batch_size=None, sample_weight=None, validation_data=None, **kwargs):
        """`keras.Model.fit`, also on raw text when the model has a preprocessor.

        `x` may be strings, `{"prompts": [...], "responses": [...]}` (or
        prompts in `x` and responses in `y`), conversations, a
        `keras.utils.PyDataset` of those, or (TensorFlow backend) a
        `tf.data.Dataset` of strings; the preprocessor turns them into token
        ids, labels and loss weights on response tokens only. Token-id inputs
        pass straight through.
        """
        from keras_gemma.preprocessor import is_raw_text, to_fit_data

        if self.preprocessor is not None and is_raw_text(x):
            if sample_weight is not None:
                raise ValueError("With raw text, loss weights come from the preprocessor: pass no `sample_weight`.")
            data = to_fit_data(self.preprocessor, x, y, batch_size=batch_size)
            x, y, sample_weight = data["x"], data["y"], data["sample_weight"]
            batch_size = data.get("batch_size")
            if validation_data is not None and is_raw_text(validation_data):
                val = to_fit_data(self.preprocessor, validation_data)
                validation_data = val["x"] if val["y"] is None else (val["x"], val["y"], val["sample_weight"])
        return super().fit(
            x=x, y=y, batch_size=batch_size, sample_weight=sample_weight, validation_data=validation_data, **kwargs
        )

    # -- presets (keras_gemma/checkpoints/preset.py) ---------------------------

    @classmethod
    def from_preset(cls, handle, dtype=None, load_weights=True):
        """A model (with a preprocessor when the preset has a tokenizer) from a
        preset name, `kaggle://` or `hf://` handle, keras-hub or Hugging Face
        directory, or `.gguf` file. See `GemmaBackbone.from_preset`.

        Example:
        ```python
        lm = keras_gemma.GemmaCausalLM.from_preset("gemma-3-270m-q4_k_m.gguf")
        ```
        """
        return preset.load_causal_lm(handle, cls, dtype=dtype, load_weights=load_weights)

    def save_to_preset(self, directory):
        """Writes a keras-hub task preset; `keras_hub.models.GemmaCausalLM.from_preset` loads it.

        A quantized (int8/int4) model is written as keras_gemma's quantized
        preset, which only keras_gemma loads (exactly: same logits); see
        `GemmaBackbone.save_to_preset`. With LoRA enabled this raises.

        Example:
        ```python
        lm.quantize("int8")
        lm.save_to_preset("gemma_int8")  # warns: keras-hub cannot load it
        lm = keras_gemma.GemmaCausalLM.from_preset("gemma_int8")
        ```
        """
        preset.save_causal_lm(self, directory)

    def export_to_transformers(self, directory):
        """Writes a Hugging Face checkpoint that `transformers` loads (float
        models only: quantized or LoRA-enabled models raise ValueError)."""
        tokenizer = self.preprocessor.tokenizer if self.preprocessor is not None else None
        self.backbone.export_to_transformers(directory, tokenizer=tokenizer)

    def quantize(self, mode=None, config=None, weight_only=True, **kwargs):
        """Weight-only int8/int4 quantization of the backbone; see `GemmaBackbone.quantize`."""
        self.backbone.quantize(mode, config=config, weight_only=weight_only, **kwargs)
        quantization.refresh(self)

    def get_config(self):
        config = {
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "name": self.name,
            "trainable": self.trainable,
        }
        if self.preprocessor is not None:
            config["preprocessor"] = keras.saving.serialize_keras_object(self.preprocessor)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        if config.get("preprocessor") is not None:
            config["preprocessor"] = keras.saving.deserialize_keras_object(config["preprocessor"])
        return cls(**config)
