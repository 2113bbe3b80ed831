"""README.md stays true: its Python blocks run as written, and its install
commands and claims match the repository (issue 28).

Every ```python block runs, in order, in one fresh process per backend, as a
reader pastes them into one session (later blocks use `lm` from earlier
ones), in a temporary directory. Two substitutions, both made in the
process's prelude and nowhere in the blocks' text:

- `from_preset` on a handle that needs a download (a built-in name,
  `kaggle://`, `hf://`; no network here) returns a tiny random Gemma 3 with
  the real Gemma 3 tokenizer (from the 270M GGUF), so every call after it runs
  for real, fast;
- `gemma-3-270m-q4_k_m.gguf` in the working directory is the real Gemma 3
  270M GGUF (a symlink), so the blocks that load, save, export and quantize it
  work on the real model.
"""

import os
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import backend
from real_model import real_gguf_path  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def blocks(language):
    return re.findall(rf"^```{language}\n(.*?)^```", _read("README.md"), re.S | re.M)


PRELUDE = textwrap.dedent(
    """
    import os, sys, time, traceback
    import keras_gemma
    from keras_gemma.checkpoints import download
    from keras_gemma.tokenizer import GemmaTokenizer
    from keras_gemma.preprocessor import GemmaCausalLMPreprocessor

    real_from_preset = keras_gemma.GemmaCausalLM.from_preset.__func__

    def needs_download(handle):
        return isinstance(handle, str) and (
            handle in keras_gemma.list_presets() or handle.startswith((download.KAGGLE_SCHEME, download.HF_SCHEME)))

    def tiny(dtype=None):
        backbone = keras_gemma.GemmaBackbone(
            vocabulary_size=262_144, num_layers=2, hidden_dim=32, num_query_heads=2, num_key_value_heads=1,
            head_dim=16, intermediate_dim=64, layer_types=("local", "global"), sliding_window_size=8,
            max_sequence_length=512, use_qk_norm=True, use_post_norms=True, dtype=dtype)
        tokenizer = GemmaTokenizer.from_gguf({gguf!r})
        return keras_gemma.GemmaCausalLM(backbone, GemmaCausalLMPreprocessor(tokenizer, sequence_length=64))

    def from_preset(cls, handle, dtype=None, load_weights=True, sliding_window_size=None):
        if needs_download(handle):
            lm = tiny(dtype)
            if sliding_window_size is not None:
                lm.set_sliding_window(sliding_window_size)
            return lm
        return real_from_preset(
            cls, handle, dtype=dtype, load_weights=load_weights, sliding_window_size=sliding_window_size)

    keras_gemma.GemmaCausalLM.from_preset = classmethod(from_preset)
    os.symlink({gguf!r}, "gemma-3-270m-q4_k_m.gguf")
    """
)


@pytest.mark.large
def test_every_python_block_runs(real_gguf_path, tmp_path):  # noqa: F811
    code = blocks("python")
    assert len(code) >= 4
    script = [PRELUDE.format(gguf=real_gguf_path), "namespace = {}"]
    for i, block in enumerate(code):
        script.append(
            f"start = time.time()\nexec(compile({block!r}, 'README block {i}', 'exec'), namespace)\n"
            f"print('BLOCK {i} ok', round(time.time() - start, 1), flush=True)"
        )
    env = {**os.environ, "KERAS_BACKEND": backend(), "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", "\n".join(script)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-4000:]}"
    for i in range(len(code)):
        assert f"BLOCK {i} ok" in result.stdout
    # What the blocks wrote, where they said.
    for written in ("adapter.lora.npz", "my_preset/config.json", "my_hf_model/model.safetensors", "gemma_int8/config.json"):
        assert (tmp_path / written).exists(), written


def pip_installs():
    return [line for block in blocks("bash") for line in re.findall(r"pip install [^&\n]*", block)]


def test_install_commands_work_from_a_checkout():
    """keras-gemma is on no index: README installs the checkout (`-e .`), with extras pyproject defines."""
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = set(tomllib.load(f)["project"]["optional-dependencies"])
    readme = _read("README.md")
    assert "keras-gemma[" not in readme and "not on PyPI" in readme
    installs = pip_installs()
    assert len(installs) >= 3
    for command in installs:
        if "torch==" in command:
            continue  # PyTorch's CPU build (below)
        found = re.findall(r'-e "\.\[([a-z,-]+)\]"', command)
        assert found, command
        assert set(found[0].split(",")) <= extras, command
    for extra in re.findall(r'pip install -e "\.\[([a-z-]+)\]"', readme):
        assert extra in extras


def test_pytorch_cpu_build_is_documented_where_pinned():
    """The pin picks torch's version, not its build: PyPI's 2.13.0 is CUDA on
    Linux (checked with `pip download --no-deps torch==2.13.0`, see the closing
    note of issue 28), so each place that pins it names PyTorch's CPU index."""
    index = "https://download.pytorch.org/whl/cpu"
    constraints = _read(".ci/constraints.txt")
    assert re.search(r"^torch==2\.13\.0$", constraints, re.M)
    for name in ("README.md", "CONTRIBUTING.md", ".ci/constraints.txt"):
        text = _read(name)
        assert index in text and "CUDA build" in text, name
        assert "(the CPU build)" not in text and "(CPU build)" not in text, name
    assert any("torch==2.13.0" in c and f"--index-url {index}" in c for c in pip_installs())


def test_keras_hub_bound_matches_what_readme_describes():
    import tomllib

    import keras_hub

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        tests_extra = tomllib.load(f)["project"]["optional-dependencies"]["tests"]
    bound = next(re.search(r"keras-hub>=([\d.]+)", d).group(1) for d in tests_extra if d.startswith("keras-hub"))
    assert f"keras-hub ({bound} to 0.32" in _read("README.md")
    installed = tuple(int(x) for x in keras_hub.__version__.split(".")[:2])
    assert installed >= tuple(int(x) for x in bound.split(".")), keras_hub.__version__


def test_contributing_points_inside_the_repository():
    text = _read("CONTRIBUTING.md")
    assert "../" not in text
    for path in re.findall(r"`((?:keras_gemma|tests|examples|benchmarks|\.ci)/[\w./]*)`", text):
        assert os.path.exists(os.path.join(ROOT, path.rstrip("/"))), path


def test_readme_python_blocks_define_what_they_use():
    """`keras`, `np`, `ids` and `mask` are defined before use, in the block order above."""
    code = "\n".join(blocks("python"))
    for name, definition in (("keras", "import keras"), ("np", "import numpy as np"), ("ids", "ids ="), ("mask", "mask =")):
        first_use = re.search(rf"\b{name}\b[.,)\s]", code.replace(definition, "\0" * len(definition))).start()
        assert definition in code and code.index(definition) < first_use, name
