"""QLoRA: LoRA on an int8 / int4 base trains like LoRA on the float base, and
the adapter's update applies on top of the dequantized kernel."""

import numpy as np
import pytest

import keras
from conftest import to_numpy
from keras_gemma.lora import TARGETS, targeted_layers
from keras_gemma.quantization import dequantized_embeddings
from test_quantization import assign_random_weights, batch, effective_kernel, new_model


def fit_losses(mode, targets, epochs=8):
    keras.utils.set_random_seed(0)
    model = new_model()
    embeddings = model.backbone.token_embedding.embeddings
    embeddings.assign(embeddings * 4.0)  # a sharper head, as in test_lora
    if mode != "float32":
        model.quantize(mode)
    model.backbone.enable_lora(4, alpha=8, target_layers=targets)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    ids = np.random.default_rng(3).integers(0, 256, (4, 9)).astype("int32")
    inputs = {"token_ids": ids[:, :-1], "padding_mask": np.ones((4, 8), bool)}
    return model.fit(inputs, ids[:, 1:], batch_size=4, epochs=epochs, verbose=0).history["loss"]


def test_loss_falls_on_a_quantized_base_as_on_the_float_base(targets="all"):
    # ("query", "value") trains as well (checked by hand); "all" keeps the suite fast and covers every projection.
    reference = fit_losses("float32", targets)
    for mode in ("int8", "int4"):
        losses = fit_losses(mode, targets)
        print(f"{mode} {targets}: {losses[0]:.3f} -> {losses[-1]:.3f} (float32: {reference[0]:.3f} -> {reference[-1]:.3f})")
        assert np.isfinite(losses).all()
        # The same drop as the float base, within the quantization error.
        assert losses[-1] < 0.8 * losses[0]
        assert abs(np.log(losses[-1] / reference[-1])) < np.log(1.5), (losses, reference)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_adapter_adds_to_the_dequantized_kernel(mode):
    """A quantized base with LoRA equals a float model whose kernels are
    dequant(kernel) + (alpha / rank) * A @ B."""
    model = new_model()
    assign_random_weights(model)
    model.quantize(mode)
    kernel_shapes = {name: tuple(variable.shape) for name, variable in new_model().backbone.weight_map().items()}
    dequantized = {
        name: effective_kernel(layer, kernel_shapes[name])
        for name, layer in targeted_layers(model.backbone, tuple(TARGETS))
    }
    inputs = batch()
    mask = inputs["padding_mask"]
    base = to_numpy(model(inputs))[mask]
    rank, alpha = 3, 6.0
    model.backbone.enable_lora(rank, alpha=alpha, target_layers="all")
    rng = np.random.default_rng(5)
    reference = new_model()
    assign_random_weights(reference)  # the same norms; kernels and table below
    reference.backbone.token_embedding.embeddings.assign(
        dequantized_embeddings(model.backbone.token_embedding, "float32")
    )
    targets = dict(targeted_layers(reference.backbone, tuple(TARGETS)))
    for name, layer in targeted_layers(model.backbone, tuple(TARGETS)):
        a = rng.normal(size=layer.lora_kernel_a.shape).astype("float32") * 0.3
        b = rng.normal(size=layer.lora_kernel_b.shape).astype("float32") * 0.3  # non-zero: the adapter bites
        layer.lora_kernel_a.assign(a)
        layer.lora_kernel_b.assign(b)
        targets[name].kernel.assign(dequantized[name] + (alpha / rank) * np.tensordot(a, b, axes=1))
    expected = to_numpy(reference(inputs))[mask]
    actual = to_numpy(model(inputs))[mask]
    np.testing.assert_allclose(actual, expected, atol=1e-4 * np.abs(expected).max())
    assert np.abs(base - expected).max() > 0.05 * np.abs(expected).max()  # the adapter changed the logits

