"""`GemmaBackbone(remat="blocks")`: the same loss and gradients as without,
on every backend; off outside training. (Its memory saving is measured in
`benchmarks/finetune.py`.)"""

import numpy as np
import pytest

import keras
from keras import ops

import keras_gemma
from conftest import to_numpy
from test_losses import model_value_and_gradients


def tiny(remat):
    config = keras_gemma.GemmaConfig(
        vocabulary_size=60, num_layers=2, hidden_dim=16, num_query_heads=2, num_key_value_heads=1, head_dim=8,
        intermediate_dim=32, layer_types=("local", "global"), sliding_window_size=3,
        use_post_norms=True, use_qk_norm=True, final_logit_softcap=4.0,
    )
    keras.utils.set_random_seed(0)
    model = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config, remat=remat))
    model.compile(loss=keras_gemma.losses.CausalLMLoss(chunk_size=7))
    return model


def test_remat_blocks_gives_the_same_gradients():
    ids = np.random.default_rng(0).integers(0, 60, (2, 11)).astype("int32")
    mask = np.ones((2, 11), bool)
    mask[1, -3:] = False
    x, y = {"token_ids": ids, "padding_mask": mask}, ops.convert_to_tensor(np.roll(ids, -1, axis=1))
    results = []
    for remat in (None, "blocks"):
        model = tiny(remat)  # every weight trains: norms, projections, the embedding
        results.append(model_value_and_gradients(model, lambda: model.compute_loss(x, y, model(x, training=True))))
    (value, grads), (remat_value, remat_grads) = results
    np.testing.assert_allclose(remat_value, value, rtol=1e-6)
    assert len(grads) == len(remat_grads) > 3  # the same variables, in the same order, under other model names
    for (path, grad), remat_grad in zip(grads.items(), remat_grads.values()):
        np.testing.assert_allclose(remat_grad, grad, atol=1e-6, rtol=1e-5, err_msg=path)


def test_remat_is_saved_and_off_outside_training():
    model = tiny("blocks")
    config = model.backbone.get_config()
    assert keras_gemma.GemmaBackbone.from_config(config).remat == "blocks"
    ids = np.array([[3, 9, 4, 7]], "int32")
    plain = tiny(None)
    np.testing.assert_allclose(to_numpy(model({"token_ids": ids})), to_numpy(plain({"token_ids": ids})), atol=1e-6)
    with pytest.raises(ValueError, match="`remat` must be one of"):
        keras_gemma.GemmaBackbone(model.config, remat="layers")


@pytest.mark.skipif(keras.config.backend() != "jax", reason="XLA's memory analysis of JAX's train step")
def test_remat_holds_less_memory_in_the_jax_train_step(monkeypatch):
    """The train step `fit` compiles keeps one block's activations, not all
    of them: on CPU, XLA would otherwise merge the recomputation back into
    the forward pass (`backends.cpu.remat_train_step`)."""
    import jax
    from keras.src.backend.jax import trainer

    options = []

    def recording_jit(fn, **kwargs):  # Keras' jit of the train step, recording its compiler options
        options.append(kwargs.get("compiler_options"))
        return jax.jit(fn, **kwargs)

    monkeypatch.setattr(trainer, "jit", recording_jit)
    config = keras_gemma.GemmaConfig(
        vocabulary_size=64, num_layers=6, hidden_dim=64, num_query_heads=2, num_key_value_heads=1, head_dim=32,
        intermediate_dim=512, layer_types=("local", "global") * 3, sliding_window_size=16,
    )
    ids = np.random.default_rng(0).integers(0, 64, (4, 65)).astype("int32")
    data = ({"token_ids": ids[:, :-1], "padding_mask": np.ones((4, 64), bool)}, ids[:, 1:], np.ones((4, 64), "float32"))
    temporary = {}
    for remat in (None, "blocks"):
        model = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config, remat=remat))
        model.backbone.enable_lora(4)
        model.compile(optimizer="adam")
        model.fit(data[0], data[1], sample_weight=data[2], batch_size=4, verbose=0)
        state = [[v.value for v in variables] for variables in (
            model.trainable_variables, model.non_trainable_variables, model.optimizer.variables, model.metrics_variables)]
        step = jax.jit(model.train_step, compiler_options=options[-1]).lower(state, data).compile()
        temporary[remat] = step.memory_analysis().temp_size_in_bytes
    assert options == [None, {"xla_disable_hlo_passes": "cse_barrier_expander"}] or keras_gemma.backends.cpu.on_cpu() is False
    assert temporary["blocks"] < 0.6 * temporary[None], temporary
