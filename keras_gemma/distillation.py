"""Knowledge distillation through `fit`, as the Gemma 2 report trains its
2B and 9B models: the student learns the teacher's whole next-token
distribution, not only the token that came next.

The loss per token, with the teacher's probabilities `p = softmax(z_t / T)`
and the student's `q = softmax(z_s / T)` at temperature `T`:

- `divergence="cross_entropy"` (the report's): `T^2 * -sum(p * log q)`;
- `divergence="kl"`: `T^2 * sum(p * (log p - log q))`, the same gradient,
  zero when the student matches the teacher.

`T^2` keeps the gradient's size independent of `T` (Hinton et al. 2015;
Keras' `keras.distillation.LogitsDistillation` scales its KL the same way).
With `student_loss_weight=a` the loss is `a * hard + (1 - a) * soft`, `hard`
being cross-entropy with the data's next tokens (Keras' `Distiller`
convention; the report uses `a = 0`).

Neither model's `(batch, seq, vocab)` logits exist: the loss runs through
`losses.chunked_head_loss`, a chunk of tokens at a time, the teacher's
logits for a chunk made from its final hidden states inside the chunk. Keras'
own `keras.distillation.Distiller` calls both models for their full logits,
which on Gemma's 262,144-token vocabulary is 1 GB per 1,000 tokens each.
"""

import keras
from keras import ops

from keras_gemma import losses as losses_lib
from keras_gemma import precision
from keras_gemma.preprocessor import fit_arguments

DIVERGENCES = ("cross_entropy", "kl")


def distillation_chunk(student_logits, teacher_logits, labels, *, temperature=1.0, divergence="cross_entropy",
                       student_loss_weight=0.0):
    """One chunk's distillation loss from float32 logits (c, v) of both models
    and the data's next tokens (c,): `(loss (c,), dloss/dstudent_logits
    (c, v), kl (c,))`, `kl` being the KL divergence at the temperature."""
    t = float(temperature)
    teacher_log_p = ops.log_softmax(teacher_logits / t, axis=-1)
    student_log_q = ops.log_softmax(student_logits / t, axis=-1)
    p = ops.exp(teacher_log_p)
    cross_entropy = -ops.sum(p * student_log_q, axis=-1)
    kl = cross_entropy + ops.sum(p * teacher_log_p, axis=-1)
    loss = t * t * (kl if divergence == "kl" else cross_entropy)
    gradient = t * (ops.exp(student_log_q) - p)  # d(t^2 * cross_entropy) / d student_logits
    if student_loss_weight:
        a = float(student_loss_weight)
        hard, hard_gradient, _ = losses_lib.cross_entropy_chunk(student_logits, labels)
        loss, gradient = a * hard + (1 - a) * loss, a * hard_gradient + (1 - a) * gradient
    return loss, gradient, kl


@keras.saving.register_keras_serializable(package="keras_gemma")
class Distiller(keras.Model):
    """Trains `student` on `teacher`'s next-token distributions with `fit`.

    Args:
        teacher: a `GemmaCausalLM`; frozen.
        student: a `GemmaCausalLM` with the same vocabulary (any size; LoRA
            enabled or not: its trainable weights are what trains).
        temperature: the softmax temperature of both distributions.
        divergence: `"cross_entropy"` (the Gemma 2 report's) or `"kl"`.
        student_loss_weight: weight in [0, 1] of the ordinary next-token
            loss (the rest is the distillation loss).
        chunk_size: tokens per chunk of logits (default:
            `losses.chunk_size_for(vocabulary_size)`).

    `fit` takes what `GemmaCausalLM.fit` takes: token ids with labels and
    sample weights, or raw text that the student's preprocessor turns into
    them (weights on response tokens only). The loss is the weighted mean
    over tokens; the `kl_divergence` metric is the KL divergence of the
    student from the teacher at `temperature`. `evaluate` reports both.

    Example:
    ```python
    teacher = keras_gemma.GemmaCausalLM.from_preset("gemma2_9b_en")
    student = keras_gemma.GemmaCausalLM.from_preset("gemma2_2b_en")
    student.backbone.enable_lora(8)
    distiller = keras_gemma.Distiller(teacher, student, temperature=1.0)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-4))
    distiller.fit(texts, batch_size=2, epochs=1)
    student.generate("...")
    ```
    """

    def __init__(self, teacher, student, temperature=1.0, divergence="cross_entropy", student_loss_weight=0.0,
                 chunk_size=None, **kwargs):
        super().__init__(**kwargs)
        for role, model in (("teacher", teacher), ("student", student)):
            if not hasattr(model, "backbone") or not hasattr(model.backbone, "token_embedding"):
                raise TypeError(f"`{role}` must be a keras_gemma.GemmaCausalLM, got {type(model).__name__}.")
        if teacher.config.vocabulary_size != student.config.vocabulary_size:
            raise ValueError(
                f"The teacher and the student must share a vocabulary: the teacher has "
                f"{teacher.config.vocabulary_size} tokens, the student {student.config.vocabulary_size}."
            )
        if divergence not in DIVERGENCES:
            raise ValueError(f"`divergence` must be one of {DIVERGENCES}, got {divergence!r}.")
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"`temperature` must be a positive number, got {temperature!r}.")
        if not isinstance(student_loss_weight, (int, float)) or not 0 <= student_loss_weight <= 1:
            raise ValueError(f"`student_loss_weight` must be between 0 and 1, got {student_loss_weight!r}.")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"`chunk_size` must be a positive number of tokens, got {chunk_size!r}.")
        self.teacher, self.student = teacher, student
        teacher.trainable = False
        # A student made from the teacher's weights (a layer-pruned copy) may
        # hold the same arrays: fit would donate one JAX buffer twice.
        shared = {id(v.value) for v in teacher.weights}
        for variable in student.weights:
            if id(variable.value) in shared:
                variable.assign(ops.copy(variable.value))
        self.temperature, self.divergence = float(temperature), divergence
        self.student_loss_weight, self.chunk_size = float(student_loss_weight), chunk_size
        self.kl_tracker = keras.metrics.Mean(name="kl_divergence")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.built = True

    @property
    def metrics(self):
        return [self.loss_tracker, self.kl_tracker]

    def call(self, inputs, training=None):
        """Both models' final hidden states `(student (b, t, d_s), teacher
        (b, t, d_t))`, which `compute_loss` turns into logits a chunk at a
        time. For the student's logits, call the student."""
        student_hidden = self.student.backbone(inputs, training=training)
        teacher_hidden = ops.stop_gradient(self.teacher.backbone(inputs, training=False))
        return student_hidden, teacher_hidden

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y is None:
            raise ValueError("Distillation needs labels: pass token ids with `y`, or raw text to a student with a preprocessor.")
        student_hidden, teacher_hidden = y_pred
        weights = ops.ones(ops.shape(y), "float32") if sample_weight is None else ops.cast(sample_weight, "float32")
        if len(weights.shape) < len(y.shape):  # one weight per sequence
            weights = ops.broadcast_to(weights[:, None], ops.shape(y))
        student_embedding = self.student.backbone.token_embedding
        teacher_table = self.teacher.backbone.token_embedding.table(teacher_hidden.dtype)
        teacher_softcap = self.teacher.config.final_logit_softcap

        def chunk_loss(student_logits, teacher_hidden_chunk, labels):
            teacher_logits = losses_lib.head_logits(teacher_hidden_chunk, teacher_table, teacher_softcap)
            return distillation_chunk(
                student_logits, teacher_logits, labels, temperature=self.temperature, divergence=self.divergence,
                student_loss_weight=self.student_loss_weight,
            )

        with precision.matmul_precision(self.student.backbone.compute_dtype):
            token_losses, kl = losses_lib.chunked_head_loss(
                student_hidden, student_embedding.table(student_hidden.dtype), chunk_loss,
                (ops.stop_gradient(teacher_hidden), ops.cast(y, "int32")),
                softcap=self.student.config.final_logit_softcap, weights=weights, chunk_size=self.chunk_size,
                table_gradient=bool(student_embedding.trainable_weights),
            )
        total = ops.maximum(ops.sum(weights), 1e-9)
        loss = ops.sum(token_losses * weights) / total
        self.kl_tracker.update_state(ops.sum(kl * weights) / total, sample_weight=total)
        self.loss_tracker.update_state(loss, sample_weight=total)
        return loss + ops.sum(self.losses) if self.losses else loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return self.get_metrics_result()

    def fit(self, x=None, y=None, batch_size=None, sample_weight=None, validation_data=None, **kwargs):
        """`keras.Model.fit`, also on raw text (see `GemmaCausalLM.fit`),
        preprocessed by the student's preprocessor."""
        arguments = fit_arguments(self.student.preprocessor, x, y, sample_weight, batch_size, validation_data)
        return super().fit(**arguments, **kwargs)

    def evaluate(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        arguments = fit_arguments(self.student.preprocessor, x, y, sample_weight, batch_size)
        arguments.pop("validation_data")
        return super().evaluate(**arguments, **kwargs)

    def get_config(self):
        return {
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "student": keras.saving.serialize_keras_object(self.student),
            "temperature": self.temperature, "divergence": self.divergence,
            "student_loss_weight": self.student_loss_weight, "chunk_size": self.chunk_size, "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for role in ("teacher", "student"):
            config[role] = keras.saving.deserialize_keras_object(config[role])
        return cls(**config)
