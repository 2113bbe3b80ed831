"""`keras_gemma.merge` against mergekit, run on the same Hugging Face checkpoints."""

import importlib
import json
import os

import numpy as np
import pytest

import keras
import keras_gemma
from keras_gemma.checkpoints import huggingface, safetensors_format
from test_lora import tiny_config

TOLERANCE = 1e-6
merge_module = importlib.import_module("keras_gemma.merge")  # `keras_gemma.merge` is the function


def random_model(seed, config=None):
    """A tiny model whose every weight (norms included) is random, so each method bites everywhere."""
    backbone = keras_gemma.GemmaBackbone(config or tiny_config())
    rng = np.random.default_rng(seed)
    for variable in backbone.weight_map().values():
        variable.assign(rng.normal(0, 0.5, tuple(variable.shape)).astype(np.float32))
    return keras_gemma.GemmaCausalLM(backbone)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    models = {name: random_model(seed) for seed, name in enumerate(["base", "a", "b"])}
    paths = {}
    for name, lm in models.items():
        paths[name] = str(root / name)
        lm.backbone.export_to_transformers(paths[name])
    return models, paths, root


def canonical(directory):
    with open(os.path.join(directory, "config.json")) as f:
        config = huggingface.config_from_hf(json.load(f))
    tensors = huggingface.canonical_weights(config, safetensors_format.read_checkpoint(directory))
    return {k: np.asarray(v.load()) for k, v in tensors.items()}


def run_mergekit(models, method, out, base=None, parameters=None):
    """mergekit's merge of `models` ((path, parameters) pairs), as canonical arrays."""
    mergekit_config = pytest.importorskip("mergekit.config")
    from mergekit.merge import MergeOptions, run_merge

    config = {
        "merge_method": method,
        "dtype": "float32",
        "models": [{"model": path, "parameters": p} for path, p in models],
        "parameters": parameters or {},
    }
    if base is not None:
        config["base_model"] = base
    run_merge(mergekit_config.MergeConfiguration.model_validate(config), out,
              MergeOptions(copy_tokenizer=False))
    return canonical(out)


CASES = {
    # method: (keras_gemma.merge kwargs, mergekit per-model parameters)
    "linear": (dict(weights=[0.3, 0.9]), [{"weight": 0.3}, {"weight": 0.9}]),
    "task_arithmetic": (dict(weights=[0.7, 0.4], lambda_=0.8), [{"weight": 0.7}, {"weight": 0.4}]),
    "ties": (dict(weights=[0.6, 1.0], density=[0.5, 0.7]), [{"weight": 0.6, "density": 0.5}, {"weight": 1.0, "density": 0.7}]),
}


@pytest.mark.parametrize("blocks", [False, True], ids=["whole", "row_blocks"])
@pytest.mark.parametrize("method", sorted(CASES))
def test_method_matches_mergekit(checkpoints, tmp_path, method, blocks, monkeypatch):
    if blocks:  # the embedding (64 x 32) written in blocks of 3 rows, as a real embedding is
        monkeypatch.setattr(merge_module, "ROW_BLOCK_ELEMENTS", 100)
    _, paths, _ = checkpoints
    kwargs, parameters = CASES[method]
    base = None if method == "linear" else paths["base"]
    shared = {"lambda": 0.8} if method == "task_arithmetic" else {}
    expected = run_mergekit(list(zip([paths["a"], paths["b"]], parameters)), method, str(tmp_path / "mk"), base, shared)
    out = keras_gemma.merge([paths["a"], paths["b"]], method=method, base=base, output=str(tmp_path / "ours"), **kwargs)
    ours = canonical(out)
    assert ours.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(ours[name], expected[name], atol=TOLERANCE, rtol=0, err_msg=name)


@pytest.mark.parametrize("blocks", [False, True], ids=["whole", "row_blocks"])
def test_slerp_matches_mergekit(checkpoints, tmp_path, blocks, monkeypatch):
    models, paths, _ = checkpoints
    mergekit_config = pytest.importorskip("mergekit.config")
    from mergekit.merge import MergeOptions, run_merge

    config = {
        "merge_method": "slerp", "dtype": "float32", "base_model": paths["base"],
        "models": [{"model": paths["base"]}, {"model": paths["a"]}], "parameters": {"t": 0.3},
    }
    run_merge(mergekit_config.MergeConfiguration.model_validate(config), str(tmp_path / "mk"), MergeOptions(copy_tokenizer=False))
    expected = canonical(str(tmp_path / "mk"))
    if blocks:  # from the files, written in blocks of rows (the angle from a first pass over them)
        monkeypatch.setattr(merge_module, "ROW_BLOCK_ELEMENTS", 100)
        ours = canonical(keras_gemma.merge([paths["a"]], method="slerp", base=paths["base"], t=0.3, output=str(tmp_path / "ours")))
    else:  # from models in memory, returning a model
        merged = keras_gemma.merge([models["a"]], method="slerp", base=models["base"], t=0.3)
        ours = {name: keras.ops.convert_to_numpy(v) for name, v in merged.backbone.weight_map().items()}
    for name in expected:
        np.testing.assert_allclose(ours[name], expected[name], atol=TOLERANCE, rtol=0, err_msg=name)


def test_refuses_different_architectures(checkpoints):
    models, _, _ = checkpoints
    other = random_model(3, tiny_config(intermediate_dim=64))
    with pytest.raises(ValueError, match="different architectures.*intermediate_dim"):
        keras_gemma.merge([models["a"], other])


def test_bad_arguments(checkpoints, tmp_path):
    models, _, _ = checkpoints
    with pytest.raises(ValueError, match="needs `base=`"):
        keras_gemma.merge([models["a"], models["b"]], method="ties")
    with pytest.raises(ValueError, match="Unknown merge method"):
        keras_gemma.merge([models["a"]], method="average")
    with pytest.raises(ValueError, match="one weight per model"):
        keras_gemma.merge([models["a"], models["b"]], weights=[1.0])
    assert not os.path.exists(tmp_path / "out")


def test_streams_one_tensor_at_a_time(checkpoints, tmp_path, monkeypatch):
    """Writing a merge reads each input tensor once, just before its merged tensor is written."""
    _, paths, _ = checkpoints
    loads = []
    read, write = safetensors_format._loader, safetensors_format.write_tensors

    def counting_loader(path, start, entry):
        load = read(path, start, entry)
        return lambda: loads.append(entry["shape"]) or load()

    def checking_write(path, tensors, metadata=None):
        assert not loads, "a tensor was read before writing began"

        def checked(i, load):
            value = load()
            assert len(loads) == 2 * (i + 1), "inputs were read ahead of the tensor being written"
            return value

        tensors = {name: (shape, dtype, lambda i=i, load=load: checked(i, load))
                   for i, (name, (shape, dtype, load)) in enumerate(tensors.items())}
        return write(path, tensors, metadata)

    monkeypatch.setattr(safetensors_format, "_loader", counting_loader)
    monkeypatch.setattr(safetensors_format, "write_tensors", checking_write)
    keras_gemma.merge([paths["a"], paths["b"]], output=str(tmp_path / "out"))
    assert len(loads) == 2 * len(huggingface.tensor_names(tiny_config()))
