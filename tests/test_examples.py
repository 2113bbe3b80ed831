"""The examples run, end to end, so that none can silently break.

The real Gemma 3 270M costs about 20 s to load per process (and each backend
compiles generation and a training step), so generate.py, chat.py and
finetune.py share one process and one loaded model: `main(argv, lm=lm)` parses
the same flags as the command line. generate.py also runs once as a plain
command with no model flags, the way a user first meets it. distributed.py
runs under JAX only (keras.distribution shards on JAX).
"""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import backend
from real_model import real_gguf_path  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
TIMEOUT = 600

# generate, chat (scripted and piped) and finetune on one loaded model.
SHARED_MODEL_SCRIPT = textwrap.dedent(
    """
    import io, json, sys
    sys.path.insert(0, {examples!r})
    import _common
    _common.set_backend({backend!r})
    import chat, finetune, generate

    lm = _common.load_model(log=_common.stderr)
    print("=== generate")
    completion = generate.main(["--prompt", "The capital of France is", "--max-new-tokens", "4",
                                "--sampler", "top_k", "--top-k", "5", "--seed", "1"], lm=lm)
    print("=== chat")
    replies = chat.main(["--message", "What is the capital of Kenya?", "--message", "/reset",
                         "--message", "And of Peru?", "--max-new-tokens", "4"], lm=lm)
    print("=== chat piped")
    sys.stdin = io.StringIO("Name a colour.\\n/quit\\nnever read\\n")
    piped = chat.main(["--max-new-tokens", "2"], lm=lm)
    print("=== finetune")
    result = finetune.main(["--steps", "2", "--batch-size", "4", "--eval-examples", "8",
                            "--show", "1", "--max-new-tokens", "4"], lm=lm)
    print("RESULT " + json.dumps({{"completion": completion, "replies": replies, "piped": piped,
                                   "loss_before": result["loss_before"], "loss_after": result["loss_after"],
                                   "tensorflow": sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow")}}))
    """
)


def _example(name):
    """An example's module (their top level imports no Keras)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, EXAMPLES)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(EXAMPLES)
    return module


def run(args, gguf, **kwargs):
    env = {
        **os.environ,
        "KERAS_BACKEND": backend(),
        "KERAS_GEMMA_GGUF": gguf,
        "PYTHONPATH": ROOT,
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    env.update(kwargs.pop("env", {}))
    result = subprocess.run(
        [sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, **kwargs
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    return result.stdout


@pytest.mark.large
def test_generate_chat_and_finetune_on_the_real_270m(real_gguf_path):  # noqa: F811
    stdout = run(["-c", SHARED_MODEL_SCRIPT.format(examples=EXAMPLES, backend=backend())], real_gguf_path)
    result = json.loads(stdout.split("RESULT ", 1)[1])
    sections = dict(re.findall(r"=== ([a-z ]+)\n(.*?)(?==== |RESULT )", stdout, re.S))

    # generate.py streams the prompt, then the completion.
    assert result["completion"].strip()
    assert sections["generate"].startswith("The capital of France is" + result["completion"])

    # chat.py: two scripted turns around a /reset, each streamed after "gemma> ".
    assert len(result["replies"]) == 2
    assert "you> What is the capital of Kenya?\ngemma> " in sections["chat"]
    assert "[conversation reset]" in sections["chat"]
    assert sections["chat"].count("gemma> ") == 2
    # Turns piped on stdin (not a terminal), up to /quit.
    assert len(result["piped"]) == 1 and "you> Name a colour." in sections["chat piped"]

    # finetune.py: the progress bar, and two LoRA steps already lower the held-out loss.
    assert "2/2" in sections["finetune"]
    before, after = result["loss_before"], result["loss_after"]
    assert math.isfinite(before) and math.isfinite(after)
    assert after < before, (before, after)
    assert re.search(r"Held-out loss: [\d.]+ before, [\d.]+ after 2 steps", sections["finetune"])
    assert "before: " in sections["finetune"] and "after: " in sections["finetune"]

    # No TensorFlow unless it is the backend: not for seeding, loading, generating or training.
    if backend() != "tensorflow":
        assert result["tensorflow"] == [], result["tensorflow"][:5]


@pytest.mark.large
@pytest.mark.skipif(backend() != "jax", reason="the shared-model test covers generate.py on this backend; one CLI run is enough")
def test_generate_cli_with_defaults(real_gguf_path):  # noqa: F811
    """`python examples/generate.py` as a user types it (only the length shortened)."""
    stdout = run([os.path.join(EXAMPLES, "generate.py"), "--max-new-tokens", "4"], real_gguf_path)
    prompt = _example("generate").DEFAULT_PROMPT
    assert stdout.startswith(prompt) and len(stdout.strip()) > len(prompt), stdout


@pytest.mark.skipif(backend() != "jax", reason="keras.distribution shards variables on JAX only")
def test_distributed_tiny():
    stdout = run([os.path.join(EXAMPLES, "distributed.py"), "--steps", "2", "--max-new-tokens", "4"], gguf="",
                 env={"XLA_FLAGS": ""})
    assert "mesh (batch=2, model=4)" in stdout
    assert stdout.count("same as single-device: True") == 2
    differences = [float(x) for x in re.findall(r"max \|distributed - single-device\| logits: (\S+)", stdout)]
    assert len(differences) == 2 and max(differences) < 1e-4, differences
    assert "('model', 'batch', None)" in stdout  # attention sharded by head
    losses = re.findall(r"training loss over 2 step\(s\): (\S+), (\S+)", stdout)
    assert len(losses) == 2 and all(math.isfinite(float(a)) and math.isfinite(float(b)) for a, b in losses)
    assert stdout.rstrip().endswith("done")
