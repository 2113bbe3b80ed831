"""Bad input gives errors that name the problem; saving is all-or-nothing.

Also a tiny GGUF written with the `gguf` package (llama.cpp's names, norms as
1 + scale) that loads with transformers' logits, as a fast companion to the
real 270M file in `test_real_270m.py`.
"""

import json
import os

import h5py
import numpy as np
import pytest

import keras_gemma
from conftest import to_numpy
from hf_reference import build_hf, gemma3_config, hf_logits, padded_batch, state_dict_numpy
from keras_gemma.checkpoints import keras_hub_format, preset
from keras_gemma.checkpoints.weights import CheckpointError
from keras_gemma.tokenizer import GemmaTokenizer

gguf = pytest.importorskip("gguf")


def tiny_lm():
    config = keras_gemma.GemmaConfig(
        vocabulary_size=64, num_layers=2, hidden_dim=32, num_query_heads=2, num_key_value_heads=1,
        head_dim=16, intermediate_dim=48,
    )
    return keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config))


@pytest.fixture
def saved(tmp_path):
    directory = str(tmp_path / "preset")
    tiny_lm().save_to_preset(directory)
    return directory


def truncate(path, fraction=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * fraction))


# -- names and handles ----------------------------------------------------------

def test_unknown_preset_name_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown preset 'gemma_99b'") as info:
        keras_gemma.GemmaCausalLM.from_preset("gemma_99b")
    assert "gemma3_270m" in str(info.value) and "gemma2_9b_en" in str(info.value)


def test_missing_path_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        keras_gemma.GemmaBackbone.from_preset(str(tmp_path / "nowhere"))


def test_directory_that_is_not_a_preset(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json"):
        keras_gemma.GemmaBackbone.from_preset(str(tmp_path))


def test_config_of_another_model_is_refused(saved):
    path = os.path.join(saved, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(class_name="LlamaBackbone", registered_name="keras_hub>LlamaBackbone")
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match="keras_hub>LlamaBackbone"):
        keras_gemma.GemmaBackbone.from_preset(saved)


def test_corrupt_config_names_the_file(saved):
    truncate(os.path.join(saved, "config.json"))
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        keras_gemma.GemmaBackbone.from_preset(saved)


# -- weights --------------------------------------------------------------------

def test_missing_weight_is_named(saved):
    with h5py.File(os.path.join(saved, "model.weights.h5"), "a") as f:
        del f["layers/gemma_decoder_block_1/attention/key_dense/vars/0"]
    with pytest.raises(CheckpointError, match=r"missing weights: blocks\.1\.attention\.key"):
        keras_gemma.GemmaBackbone.from_preset(saved)


def test_wrongly_shaped_weight_is_named(saved):
    with h5py.File(os.path.join(saved, "model.weights.h5"), "a") as f:
        del f["layers/gemma_decoder_block/ffw_linear/vars/0"]
        f["layers/gemma_decoder_block/ffw_linear/vars/0"] = np.zeros((40, 32), "float32")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.feed_forward\.down has shape \(40, 32\), expected \(48, 32\)"):
        keras_gemma.GemmaBackbone.from_preset(saved)


def test_unexpected_weight_is_named(saved):
    with h5py.File(os.path.join(saved, "model.weights.h5"), "a") as f:
        f["layers/lm_head/vars/0"] = np.zeros((3,), "float32")
    with pytest.raises(CheckpointError, match="unexpected weights: h5:layers/lm_head/vars/0"):
        keras_gemma.GemmaBackbone.from_preset(saved)


def test_truncated_h5_names_the_file(saved):
    path = os.path.join(saved, "model.weights.h5")
    truncate(path)
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        keras_gemma.GemmaBackbone.from_preset(saved)
    assert path in str(info.value)


def test_truncated_safetensors_names_the_file(tmp_path):
    tiny_lm().backbone.export_to_transformers(str(tmp_path))
    path = os.path.join(str(tmp_path), "model.safetensors")
    truncate(path, 0.9)
    with pytest.raises(CheckpointError, match="is truncated") as info:
        keras_gemma.GemmaBackbone.from_preset(str(tmp_path))
    assert path in str(info.value)


def test_missing_tokenizer_names_the_file(saved):
    with pytest.raises(CheckpointError, match="vocabulary.spm is missing"):
        GemmaTokenizer.from_preset(saved)


# -- GGUF -------------------------------------------------------------------------

def write_gguf(path, hf_model, architecture="gemma3"):
    """`hf_model` as llama.cpp would write it (float32): its names, norms stored as 1 + scale."""
    config = hf_model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_sliding_window(config.sliding_window)
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(8.0)
    names = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    for name, array in state_dict_numpy(hf_model).items():
        if name == "lm_head.weight":
            continue
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            gguf_name = f"blk.{layer}.{names[rest.rsplit('.', 1)[0]]}.weight"
        if gguf_name.endswith("norm.weight"):
            array = array + 1.0
        writer.add_tensor(gguf_name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_hf_gemma3():
    return build_hf(gemma3_config(query_pre_attn_scalar=16), seed=12)  # GGUF has no query scalar: head_dim


def test_tiny_gguf_matches_transformers(tiny_hf_gemma3, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_hf_gemma3)
    backbone = keras_gemma.GemmaBackbone.from_preset(str(path))
    config = backbone.config
    assert config.layer_types == ("local",) * 5 + ("global", "local")
    assert (config.global_rope_base, config.global_rope_scaling, config.local_rope_base) == (1e6, 8.0, 1e4)
    ids, mask = padded_batch(13)
    ours = to_numpy(keras_gemma.GemmaCausalLM(backbone)({"token_ids": ids, "padding_mask": mask}))
    np.testing.assert_allclose(ours[mask], hf_logits(tiny_hf_gemma3, ids, mask)[mask], atol=1e-4, rtol=1e-4)


def test_truncated_gguf_names_the_file(tiny_hf_gemma3, tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_hf_gemma3)
    truncate(path, 0.8)
    with pytest.raises(CheckpointError, match="is truncated") as info:
        keras_gemma.GemmaBackbone.from_preset(str(path))
    assert str(path) in str(info.value)
    with open(path, "r+b") as f:
        f.truncate(100)  # inside the metadata
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        keras_gemma.GemmaBackbone.from_preset(str(path))


def test_gguf_of_another_architecture_is_refused(tiny_hf_gemma3, tmp_path):
    path = tmp_path / "llama.gguf"
    write_gguf(path, tiny_hf_gemma3, architecture="llama")
    with pytest.raises(CheckpointError, match=r"holds a 'llama' model \(general.architecture\), not Gemma"):
        keras_gemma.GemmaCausalLM.from_preset(str(path))


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        keras_gemma.GemmaBackbone.from_preset(str(path))


# -- saving and progress ---------------------------------------------------------

def test_failed_save_leaves_no_half_written_preset(tmp_path, monkeypatch):
    model = tiny_lm()

    def fail(path, backbone, class_name):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    target = tmp_path / "preset"
    monkeypatch.setattr(keras_hub_format, "write_weights", fail)
    with pytest.raises(OSError, match="disk full"):
        model.save_to_preset(str(target))
    assert not target.exists()
    assert os.listdir(tmp_path) == []  # no temporary directory left behind

    monkeypatch.undo()
    model.save_to_preset(str(target))
    before = {name: (target / name).read_bytes() for name in ("config.json", "model.weights.h5")}
    monkeypatch.setattr(keras_hub_format, "write_weights", fail)
    with pytest.raises(OSError):
        tiny_lm().save_to_preset(str(target))
    assert {name: (target / name).read_bytes() for name in before} == before  # old preset intact
    assert sorted(os.listdir(tmp_path)) == ["preset"]


def test_save_into_an_existing_preset_adds_components(saved, tmp_path):
    spm = tmp_path / "tok.model"
    from tokenizer_fixtures import train_tiny_spm

    train_tiny_spm(spm, "control")
    GemmaTokenizer(str(spm)).save_to_preset(saved)
    assert os.path.exists(os.path.join(saved, "model.weights.h5"))
    assert GemmaTokenizer.from_preset(saved)("Hello") == GemmaTokenizer(str(spm))("Hello")


def test_large_checkpoints_show_progress(saved, monkeypatch, capsys):
    monkeypatch.setattr(preset, "PROGRESS_THRESHOLD_BYTES", 0)
    keras_gemma.GemmaBackbone.from_preset(saved)
    captured = capsys.readouterr()
    assert "Loading" in captured.err + captured.out
    monkeypatch.setattr(preset, "PROGRESS_THRESHOLD_BYTES", 1 << 40)
    keras_gemma.GemmaBackbone.from_preset(saved)
    captured = capsys.readouterr()
    assert "Loading" not in captured.err + captured.out
