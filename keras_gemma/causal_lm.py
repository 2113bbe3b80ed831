"""`GemmaCausalLM`: the backbone plus the tied output head."""

import keras
from keras import ops

from keras_gemma import classify as classify_lib
from keras_gemma import losses as losses_lib
from keras_gemma import precision, quantization
from keras_gemma.backbone import GemmaBackbone
from keras_gemma.backends import cpu
from keras_gemma.checkpoints import preset
from keras_gemma.generation import GenerationMixin
from keras_gemma.layers import soft_cap
from keras_gemma.preprocessor import GemmaCausalLMPreprocessor, fit_arguments


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
        self._chunked_loss = None  # the `CausalLMLoss` that `fit` takes from hidden states
        self._accuracy_from_loss = ()  # `CausalLMAccuracy` metrics it updates
        self.built = True

    @property
    def config(self):
        return self.backbone.config

    def compile(self, optimizer="auto", loss="auto", *, metrics=None, weighted_metrics="auto", **kwargs):
        """Configures training and generation; see `GenerationMixin.compile`.

        `loss="auto"` is a `keras_gemma.losses.CausalLMLoss`: in `fit` it
        takes the final hidden states and makes the logits a chunk of
        tokens at a time, so no step holds the `(batch, seq, vocab)` logits;
        its value is `SparseCategoricalCrossentropy(from_logits=True)`'s.
        The `"auto"` weighted metric, `CausalLMAccuracy`, then counts hits
        in the same chunks. Any other metric needs the full logits: with
        one, `fit` computes them and the loss from them, as Keras does.
        """
        if loss == "auto":
            loss = losses_lib.CausalLMLoss()
        if weighted_metrics == "auto":
            weighted_metrics = [losses_lib.CausalLMAccuracy()]
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, weighted_metrics=weighted_metrics, **kwargs)
        accuracy = [m for m in (weighted_metrics or []) if isinstance(m, losses_lib.CausalLMAccuracy)]
        only_accuracy = not metrics and len(accuracy) == len(weighted_metrics or [])
        # Other metrics need the full logits, so `fit` then makes them as
        # Keras does: JAX's trainer holds no weights outside the loss, so
        # they cannot be made later, in `compute_metrics`.
        chunked = (
            isinstance(loss, losses_lib.CausalLMLoss) and only_accuracy
            and self.config.hidden_dim != self.config.vocabulary_size
        )
        self._chunked_loss = loss if chunked else None
        self._accuracy_from_loss = tuple(accuracy) if chunked else ()

    def call(self, inputs, training=None):
        """Logits (b, t, vocab); when compiled with `CausalLMLoss` (the
        default) and training, the final hidden states (b, t, d), which
        `compute_loss` turns into the loss a chunk of tokens at a time."""
        hidden = self.backbone(inputs, training=training)
        if training and self._chunked_loss is not None:
            return hidden
        return self.logits(hidden)

    def _is_hidden(self, y_pred):
        return self._chunked_loss is not None and y_pred.shape[-1] == self.config.hidden_dim

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Keras' `compute_loss`; from hidden states (training with
        `CausalLMLoss`) the loss is `chunked_head_loss`'s."""
        if not self._is_hidden(y_pred):
            return super().compute_loss(x, y, y_pred, sample_weight, training=training)
        weights = ops.ones(ops.shape(y), "float32") if sample_weight is None else ops.cast(sample_weight, "float32")
        if len(weights.shape) < len(y.shape):  # one weight per sequence
            weights = ops.broadcast_to(weights[:, None], ops.shape(y))
        embedding = self.backbone.token_embedding
        with precision.matmul_precision(self.backbone.compute_dtype):
            token_losses, hits = losses_lib.head_cross_entropy(
                y_pred, embedding.table(y_pred.dtype), y,
                softcap=self.config.final_logit_softcap, weights=weights,
                chunk_size=self._chunked_loss.chunk_size, table_gradient=bool(embedding.trainable_weights),
            )
        for metric in self._accuracy_from_loss:
            metric.update_from_hits(hits, weights)
        loss = self._chunked_loss.reduce(token_losses, sample_weight)
        return loss + ops.sum(self.losses) if self.losses else loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """Keras' `compute_metrics`; from hidden states the accuracy (the only
        metric then) was counted by `compute_loss`."""
        if self._is_hidden(y_pred):
            if not self._compile_metrics.built:  # TensorFlow builds it at the first update
                self._compile_metrics.build(y, y_pred)
            return self.get_metrics_result()
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def logits(self, hidden):
        """Output logits (b, t, vocab) in float32 from hidden states (b, t, d)."""
        with precision.matmul_precision(self.backbone.compute_dtype):
            logits = self.backbone.token_embedding.reverse(hidden)
        return soft_cap(ops.cast(logits, "float32"), self.config.final_logit_softcap)

    def classify(self, prompts, labels=("Yes", "No")):
        """Probabilities of `labels` as the next token after each prompt.

        The softmax over the labels' logits at each prompt's last real
        token, as ShieldGemma's model card scores a prompt:
        `softmax(logits[0, -1, [yes_id, no_id]])[0]` is the probability that
        the text violates the policy.

        Args:
            prompts: a string, a list of strings (`<bos>` is added), a
                conversation or list of them (rendered with the chat
                template), or `{"token_ids", "padding_mask"}` with either
                padding side.
            labels: two or more labels, each one vocabulary token (text or
                a token id). A label that tokenizes to several tokens raises.

        Returns:
            float32 numpy `(batch, len(labels))` summing to 1 along the
            labels; `(len(labels),)` for one prompt.

        Example:
        ```python
        lm = keras_gemma.GemmaCausalLM.from_preset("shieldgemma_2b_en")
        p_violation = lm.classify(shieldgemma_prompt)[0]  # P("Yes")
        ```
        """
        return classify_lib.label_probabilities(self, prompts, labels)

    def make_train_function(self, force=False):
        with cpu.remat_train_step(self):
            return super().make_train_function(force)

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
        arguments = fit_arguments(self.preprocessor, x, y, sample_weight, batch_size, validation_data)
        return super().fit(**arguments, **kwargs)

    # -- presets (keras_gemma/checkpoints/preset.py) ---------------------------

    @classmethod
    def from_preset(cls, handle, dtype=None, load_weights=True, sliding_window_size=None):
        """A model (with a preprocessor when the preset has a tokenizer) from a
        preset name, `kaggle://` or `hf://` handle, keras-hub or Hugging Face
        directory, or `.gguf` file. See `GemmaBackbone.from_preset`.

        Example:
        ```python
        lm = keras_gemma.GemmaCausalLM.from_preset("gemma-3-270m-q4_k_m.gguf")
        lm = keras_gemma.GemmaCausalLM.from_preset("gemma2_9b_en", sliding_window_size=1024)
        ```
        """
        return preset.load_causal_lm(
            handle, cls, dtype=dtype, load_weights=load_weights, sliding_window_size=sliding_window_size
        )

    def set_sliding_window(self, size):
        """Sets the sliding-window layers' window (see
        `GemmaBackbone.set_sliding_window`); generation and `predict`
        recompile for it."""
        self.backbone.set_sliding_window(size)
        self.predict_function = self.train_function = self.test_function = None

    def save_to_preset(self, directory):
        """Writes a keras-hub task preset; `keras_hub.models.CausalLM.from_preset` loads it
        (as a `GemmaCausalLM`, `Gemma3CausalLM` or `Gemma4CausalLM`).

        A quantized (int8/int4) model, or a Gemma 4 one keras-hub cannot
        express, is written as keras_gemma's native preset, which only
        keras_gemma loads (exactly: same logits); see
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
