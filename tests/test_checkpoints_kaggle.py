"""Kaggle handles through the real kagglehub (1.0.x) code path.

No test reaches kaggle.com. kagglehub answers a versioned handle from its
cache without a network call; for the failures (gated model, no network) we
point kagglehub's API endpoint (`KAGGLE_API_ENVIRONMENT=TEST`, whose URL we
set) at a local HTTP server that answers 403, or at a closed port. Only the
endpoint URL is changed: requests, kagglehub's client and its error handling
all run for real.
"""

import http.server
import json
import socket
import threading

import numpy as np
import pytest

import keras_gemma
from conftest import to_numpy
from keras_gemma.checkpoints import preset
from keras_gemma.checkpoints.download import GatedModelError, NoNetworkError
from keras_gemma.presets import PRESETS

kagglehub = pytest.importorskip("kagglehub")

# keras-hub's Kaggle handles (its gemma, gemma2, gemma3 preset files and
# ShieldGemma's model page), written out independently of presets.py.
KAGGLE_HANDLES = {
    "keras/gemma": "gemma_2b_en/3 gemma_instruct_2b_en/3 gemma_1.1_instruct_2b_en/4 gemma_7b_en/4 "
    "gemma_instruct_7b_en/4 gemma_1.1_instruct_7b_en/5",
    "keras/codegemma": "code_gemma_2b_en/2 code_gemma_1.1_2b_en/2 code_gemma_7b_en/3 "
    "code_gemma_instruct_7b_en/3 code_gemma_1.1_instruct_7b_en/3",
    "keras/gemma2": "gemma2_2b_en/2 gemma2_instruct_2b_en/2 gemma2_9b_en/4 gemma2_instruct_9b_en/4 "
    "gemma2_27b_en/3 gemma2_instruct_27b_en/3",
    "keras/gemma3": "gemma3_270m/3 gemma3_instruct_270m/4 gemma3_1b/3 gemma3_instruct_1b/3 gemma3_4b_text/2 "
    "gemma3_instruct_4b_text/3 gemma3_12b_text/3 gemma3_instruct_12b_text/3 gemma3_27b_text/4 "
    "gemma3_instruct_27b_text/3",
    "google/shieldgemma": "shieldgemma_2b_en/2 shieldgemma_9b_en/2 shieldgemma_27b_en/2",
    # keras-hub 0.32's gemma_presets.py, gemma3_presets.py and gemma4_presets.py.
    "keras/function-gemma": "function_gemma_instruct_270m/1",
    "keras/medgemma": "medgemma_instruct_27b_text/1",
    "keras/vaultgemma": "vault_gemma_1b_en/2",
    "keras/translategemma": "translategemma_4b_it/1 translategemma_12b_it/1 translategemma_27b_it/1",
    "keras/gemma4": "gemma4_31b/2 gemma4_instruct_31b/2 gemma4_2b/2 gemma4_instruct_2b/2 gemma4_4b/2 gemma4_instruct_4b/2 gemma4_26b_a4b/2 gemma4_instruct_26b_a4b/2",
}


def expected_handles():
    out = {}
    for model, entries in KAGGLE_HANDLES.items():
        for entry in entries.split():
            name, version = entry.split("/")
            out[name] = f"kaggle://{model}/keras/{name}/{version}"
    return out


def test_every_builtin_name_maps_to_its_kaggle_handle():
    expected = expected_handles()
    assert sorted(PRESETS) == sorted(expected)
    for name, handle in expected.items():
        assert preset.preset_handle(name) == handle


def tiny_model(seed=0):
    config = keras_gemma.GemmaConfig(
        vocabulary_size=64, num_layers=2, hidden_dim=32, num_query_heads=2, num_key_value_heads=1,
        head_dim=16, intermediate_dim=48, layer_types=("local", "global"), sliding_window_size=4,
        use_post_norms=True, attention_logit_softcap=50.0, final_logit_softcap=30.0,
    )
    model = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config))
    rng = np.random.default_rng(seed)
    for w in model.backbone.weights:
        w.assign(rng.normal(0.0, 0.25, tuple(w.shape)).astype("float32"))
    return model


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def kaggle_env(tmp_path, monkeypatch):
    """kagglehub with its cache in tmp and its API at a URL the test picks (`set_endpoint`)."""
    from kagglesdk import kaggle_env

    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "TEST")
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_KERNEL_RUN_TYPE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no_credentials"))

    def set_endpoint(url):
        monkeypatch.setitem(kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.TEST, url)

    set_endpoint(f"http://127.0.0.1:{closed_port()}")  # any network call fails
    return set_endpoint


def put_in_kaggle_cache(model, handle, tmp_path):
    """Writes `model` as a preset where kagglehub caches `handle`, and marks it complete."""
    from kagglehub.cache import Cache
    from kagglehub.handle import parse_model_handle

    h = parse_model_handle(handle)
    path = tmp_path / "kagglehub" / "models" / h.owner / h.model / h.framework / h.variation / str(h.version)
    model.save_to_preset(str(path))
    Cache().mark_as_complete(h)
    return path


def test_versioned_kaggle_handle_loads_from_kagglehub_cache(kaggle_env, tmp_path):
    model = tiny_model()
    put_in_kaggle_cache(model, "keras/gemma2/keras/tiny_test/2", tmp_path)
    loaded = keras_gemma.GemmaCausalLM.from_preset("kaggle://keras/gemma2/keras/tiny_test/2")
    ids, mask = np.array([[2, 5, 9, 11, 3, 7]]), np.ones((1, 6), bool)
    np.testing.assert_array_equal(
        to_numpy(loaded({"token_ids": ids, "padding_mask": mask})),
        to_numpy(model({"token_ids": ids, "padding_mask": mask})),
    )


def test_builtin_name_resolves_through_kagglehub(kaggle_env, tmp_path):
    """`from_preset("gemma3_270m")` asks kagglehub for keras/gemma3/keras/gemma3_270m/3."""
    path = put_in_kaggle_cache(tiny_model(seed=1), "keras/gemma3/keras/gemma3_270m/3", tmp_path)
    source = preset.resolve("gemma3_270m")
    assert source.kind == preset.KERAS_HUB and source.path == str(path)
    assert keras_gemma.GemmaBackbone.from_preset("gemma3_270m").config.vocabulary_size == 64


class Forbidden(http.server.BaseHTTPRequestHandler):
    """Kaggle's answer to a gated model without an accepted license."""

    def do_POST(self):  # noqa: N802
        body = json.dumps({"code": 403, "message": "Permission 'models.get' was denied"}).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST  # noqa: N815

    def log_message(self, *args):
        pass


@pytest.fixture
def forbidding_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forbidden)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "handle, page",
    [
        ("gemma3_1b", "https://www.kaggle.com/models/keras/gemma3"),  # versioned: lists the files
        ("kaggle://keras/gemma2/keras/gemma2_2b_en", "https://www.kaggle.com/models/keras/gemma2"),  # latest version
    ],
)
def test_gated_model_says_to_accept_the_license(kaggle_env, forbidding_server, handle, page):
    kaggle_env(forbidding_server)
    with pytest.raises(GatedModelError, match="HTTP 403") as info:
        keras_gemma.GemmaCausalLM.from_preset(handle)
    message = str(info.value)
    assert "accept the license" in message and page in message


def test_no_network_says_so(kaggle_env):
    with pytest.raises(NoNetworkError, match="could not be reached") as info:
        keras_gemma.GemmaBackbone.from_preset("kaggle://keras/gemma/keras/gemma_2b_en/3")
    assert "no network" in str(info.value)
    assert isinstance(info.value, ConnectionError)


def test_bad_kaggle_handle():
    with pytest.raises(ValueError, match="Invalid Kaggle handle"):
        preset.resolve("kaggle://keras/gemma")
