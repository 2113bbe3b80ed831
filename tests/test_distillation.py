"""Distillation through `fit` (`keras_gemma.Distiller`): the loss and its
gradients against PyTorch computed from the same two logits (the report's
soft-target cross-entropy and KL, temperatures, the hard-label mix,
soft-caps), and through the models against transformers' student and
teacher; a tiny student distilled from a tiny teacher halves its KL on
held-out tokens, with LoRA too; bad input. Every backend."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import keras
from keras import ops

import keras_gemma
from conftest import to_numpy
from hf_reference import VOCAB, build_hf, gemma2_config, gemma3_config, ours_from_hf, padded_batch
from keras_gemma import losses
from keras_gemma.checkpoints.huggingface import canonical_weights
from keras_gemma.distillation import distillation_chunk
from test_losses import TOLERANCE, model_value_and_gradients, value_and_gradients


def torch_distillation(student_logits, teacher_logits, labels, weights, temperature, divergence, hard_weight):
    """The weighted mean loss over tokens, in PyTorch, from full logits (..., v)."""
    t = temperature
    log_p = F.log_softmax(teacher_logits / t, dim=-1)
    log_q = F.log_softmax(student_logits / t, dim=-1)
    if divergence == "kl":
        soft = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    else:
        soft = -(log_p.exp() * log_q).sum(-1)
    hard = F.cross_entropy(student_logits.reshape(-1, student_logits.shape[-1]), labels.reshape(-1), reduction="none")
    per_token = hard_weight * hard.reshape(labels.shape) + (1 - hard_weight) * t * t * soft
    return (per_token * weights).sum() / weights.sum()


def soft_capped(logits, cap):
    return logits if cap is None else cap * torch.tanh(logits / cap)


@pytest.mark.parametrize(
    "divergence, temperature, hard_weight, softcap",
    [("cross_entropy", 1.0, 0.0, None), ("kl", 2.0, 0.0, 3.0), ("cross_entropy", 0.5, 0.3, 3.0)],
)
def test_chunked_loss_and_gradients_equal_pytorch(divergence, temperature, hard_weight, softcap):
    rng = np.random.default_rng(0)
    b, t, v = 3, 7, 50
    student_hidden, student_table = rng.normal(size=(b, t, 8)).astype("float32"), rng.normal(size=(v, 8)).astype("float32")
    teacher_hidden, teacher_table = rng.normal(size=(b, t, 12)).astype("float32"), rng.normal(size=(v, 12)).astype("float32")
    labels = rng.integers(0, v, (b, t)).astype("int32")
    weights = ((rng.random((b, t)) > 0.3) * rng.uniform(0.5, 2.0, (b, t))).astype("float32")
    teacher_cap = 5.0

    def ours(h, e):
        def chunk_loss(student_logits, teacher_h, y):
            teacher_logits = losses.head_logits(teacher_h, teacher_table, teacher_cap)
            return distillation_chunk(student_logits, teacher_logits, y, temperature=temperature, divergence=divergence,
                                      student_loss_weight=hard_weight)

        token_losses, _ = losses.chunked_head_loss(
            h, e, chunk_loss, (teacher_hidden, labels), softcap=softcap, weights=weights, chunk_size=4, table_gradient=True
        )
        w = ops.convert_to_tensor(weights)
        return ops.sum(token_losses * w) / ops.sum(w)

    value, (d_hidden, d_table) = value_and_gradients(ours, [student_hidden, student_table])

    h, e = torch.tensor(student_hidden, requires_grad=True), torch.tensor(student_table, requires_grad=True)
    student_logits = soft_capped(h @ e.T, softcap)
    teacher_logits = soft_capped(torch.tensor(teacher_hidden) @ torch.tensor(teacher_table).T, teacher_cap)
    expected = torch_distillation(student_logits, teacher_logits, torch.tensor(labels).long(), torch.tensor(weights),
                                  temperature, divergence, hard_weight)
    expected.backward()
    np.testing.assert_allclose(value, expected.item(), rtol=TOLERANCE)
    assert np.abs(h.grad.numpy()).max() > 1e-2
    np.testing.assert_allclose(d_hidden, h.grad.numpy(), atol=TOLERANCE, rtol=TOLERANCE)
    np.testing.assert_allclose(d_table, e.grad.numpy(), atol=TOLERANCE, rtol=TOLERANCE)


def test_distiller_loss_and_gradients_equal_transformers():
    """Gemma 3 student, Gemma 2 teacher (soft-capped), KL at temperature 2
    with a hard-label share: the Distiller's loss and every student weight's
    gradient equal the same loss on transformers' two models."""
    hf_student = build_hf(gemma3_config(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"]), seed=1)
    hf_teacher = build_hf(gemma2_config(), seed=2)
    student, teacher = ours_from_hf(hf_student), ours_from_hf(hf_teacher)
    distiller = keras_gemma.Distiller(teacher, student, temperature=2.0, divergence="kl", student_loss_weight=0.25, chunk_size=5)
    ids, mask = padded_batch(9)
    ids, mask = ids[:2], mask[:2]  # right padding only: transformers' positions count from the row's start
    labels, weights = np.roll(ids, -1, axis=1), (mask & np.roll(mask, -1, axis=1)).astype("float32")
    weights[:, -1] = 0
    x = {"token_ids": ids, "padding_mask": mask}

    def loss():
        return distiller.compute_loss(x, ops.convert_to_tensor(labels), distiller(x, training=True), ops.convert_to_tensor(weights))

    value, grads = model_value_and_gradients(distiller, loss)

    inputs = {"input_ids": torch.tensor(ids).long(), "attention_mask": torch.tensor(mask.astype("int64"))}
    with torch.no_grad():
        teacher_logits = hf_teacher(**inputs).logits
    hf_student.zero_grad()
    expected = torch_distillation(hf_student(**inputs).logits, teacher_logits, torch.tensor(labels).long(),
                                  torch.tensor(weights), 2.0, "kl", 0.25)
    expected.backward()
    np.testing.assert_allclose(value, expected.item(), rtol=TOLERANCE)
    hf_grads = canonical_weights(student.config, {n: p.grad.numpy() for n, p in hf_student.named_parameters()})
    student_weights = student.backbone.weight_map()
    assert len(grads) == len(student_weights)  # the student trains, the teacher does not
    for name, variable in student_weights.items():
        np.testing.assert_allclose(grads[variable.path], np.asarray(hf_grads[name]), atol=TOLERANCE, rtol=1e-4, err_msg=name)


def tiny_pair(lora=False):
    """A 2-layer teacher and a student with the same weights on every backend:
    a smaller random one, or (`lora`) the teacher's first layer and
    embedding (a layer-pruned copy, its arrays drawn from the same seed)."""
    teacher_config = gemma3_config(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    teacher = ours_from_hf(build_hf(teacher_config, seed=0, scale=0.5))
    if lora:
        student = ours_from_hf(build_hf(gemma3_config(num_hidden_layers=1, layer_types=["sliding_attention"]), seed=0, scale=0.5))
    else:
        student = ours_from_hf(build_hf(gemma3_config(num_hidden_layers=1, layer_types=["sliding_attention"],
                                                      hidden_size=32, intermediate_size=48), seed=1))
    return teacher, student


def data(seed, rows=16, length=12):
    ids = np.random.default_rng(seed).integers(0, VOCAB, (rows, length + 1)).astype("int32")
    return {"token_ids": ids[:, :-1], "padding_mask": np.ones((rows, length), bool)}, ids[:, 1:]


@pytest.mark.parametrize("lora", [False, True])
def test_distilled_student_halves_its_kl_on_held_out_tokens(lora):
    teacher, student = tiny_pair(lora)
    teacher_weights = [to_numpy(v) for v in teacher.weights]
    if lora:
        student.backbone.enable_lora(4, target_layers="all")
        frozen = {v.path: to_numpy(v) for v in student.non_trainable_weights}
    distiller = keras_gemma.Distiller(teacher, student, temperature=1.0)
    distiller.compile(optimizer=keras.optimizers.Adam(3e-2 if lora else 1e-2))
    (x, y), (held_x, held_y) = data(0, rows=64), data(1)
    before = distiller.evaluate(held_x, held_y, verbose=0, return_dict=True)
    history = distiller.fit(x, y, batch_size=16, epochs=10, verbose=0).history
    after = distiller.evaluate(held_x, held_y, verbose=0, return_dict=True)
    assert set(history) == {"loss", "kl_divergence"}
    assert after["kl_divergence"] < 0.5 * before["kl_divergence"], (before, after)
    for weight, value in zip(teacher.weights, teacher_weights):
        np.testing.assert_array_equal(to_numpy(weight), value)
    if lora:
        assert all(np.array_equal(to_numpy(v), frozen[v.path]) for v in student.non_trainable_weights if v.path in frozen)


def test_bad_input():
    teacher, student = tiny_pair()
    other = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(keras_gemma.GemmaConfig(
        vocabulary_size=40, num_layers=1, hidden_dim=16, num_query_heads=2, num_key_value_heads=1, head_dim=8,
        intermediate_dim=32)))
    with pytest.raises(ValueError, match=f"share a vocabulary: the teacher has {VOCAB} tokens, the student 40"):
        keras_gemma.Distiller(teacher, other)
    with pytest.raises(ValueError, match="`divergence` must be one of"):
        keras_gemma.Distiller(teacher, student, divergence="js")
    with pytest.raises(ValueError, match="`temperature` must be a positive number"):
        keras_gemma.Distiller(teacher, student, temperature=0)
    with pytest.raises(ValueError, match="`student_loss_weight` must be between 0 and 1"):
        keras_gemma.Distiller(teacher, student, student_loss_weight=2)
    with pytest.raises(TypeError, match="must be a keras_gemma.GemmaCausalLM"):
        keras_gemma.Distiller(teacher, keras.Sequential([keras.layers.Dense(3)]))
