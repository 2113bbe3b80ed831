"""Generation speed: keras_gemma against keras-hub and transformers, per backend.

One run prints a table of decode tokens/s, time to first token (TTFT) and
peak memory for keras_gemma and its peers on Gemma 3 270M shapes with random
weights (speed does not depend on the values): keras-hub (`Gemma3CausalLM`
on a `Gemma3Backbone` of the same config) on each Keras backend, and on
PyTorch also transformers' `Gemma3ForCausalLM` (`--impls
...,transformers,transformers_compiled`: its eager `generate`, and
`generate` with its static cache and `torch.compile`). Each (backend,
implementation) runs in its own subprocess, so backends do not share a
process and peak memory is the implementation's own.

On a machine with a GPU every implementation runs there (JAX and PyTorch
pick it up themselves; transformers' model is moved to it), and peak memory
is the GPU's peak allocation rather than the process's resident set.

Protocol, identical for both: greedy sampling, no stop tokens. For each case
`generate` runs once to compile, then is timed `--repeats` times, best kept,
the 1-token and `new`-token calls alternating: TTFT is a call that makes one
new token; decode tokens/s is `batch * (new - 1) / (t(new) - t(1))`. Peak
memory is the process's peak resident set (VmHWM) during the case, reset
before it (`/proc/self/clear_refs`, after `gc.collect()` and glibc's
`malloc_trim`, so memory freed by earlier cases does not count), so it
includes compilation.

With `--rounds N` the driver runs every (backend, implementation) worker N
times, the implementations alternating, and reports each case's best
1-token and `new`-token times over the rounds (decode tokens/s from those
two, as above): a slow stretch of the machine then lands on both
implementations, not on whichever ran during it.

The compile call also makes keras_gemma's int8 screen of the output head
(JAX, batch 1: `keras_gemma.backends.cpu.screened_logits`), which later
calls reuse as a user's do until the weights change (~0.1 s to make).
Peak memory counts it.

keras-hub is fed token ids with `preprocessor=None` (right-padded to
`prompt + new`, its `max_length`); keras_gemma gets the same ids.

Usage:
    python benchmarks/generate.py                 # everything (~30-40 min)
    python benchmarks/generate.py --quick         # batch 1, f32, short + 512
    python benchmarks/generate.py --backends jax --dtypes float32 --repeats 3 --rounds 2
    python benchmarks/generate.py --backends jax --dtypes float32 --impls keras_gemma
    python benchmarks/generate.py --backends torch --impls keras_gemma,keras_hub,transformers,transformers_compiled
"""

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

BACKENDS = ("jax", "tensorflow", "torch")
IMPLS = ("keras_gemma", "keras_hub")
# Peers that run on PyTorch only, whatever the backend list says.
TRANSFORMERS = ("transformers", "transformers_compiled")
DTYPES = ("float32", "bfloat16")
# (name, batch, prompt tokens, new tokens)
CASES = (
    ("short", 1, 16, 32),
    ("short", 8, 16, 32),
    # Enough new tokens that the noise of a long prefill (in both timed
    # calls) does not swamp the decode time: with 8, decode was 7 steps.
    ("prompt512", 1, 512, 32),
    ("ctx2048", 1, 2048, 64),
)
QUICK_CASES = (("short", 1, 16, 16), ("prompt512", 1, 512, 4))


# -- worker: one backend, one implementation ---------------------------------------


def _peak_reset():
    """Start a case's peak from what is live now: collect garbage (a Keras
    model is freed only by the cycle collector) and hand freed heap back to
    the OS, so one case's leftovers do not count as the next one's peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass
    if os.environ.get("KERAS_BACKEND") == "torch" and _gpu():
        import torch

        torch.cuda.reset_peak_memory_stats()


def _decode_rate(batch, new, new_s, ttft_s):
    """Decode tokens/s from the `new`-token and 1-token times (NaN where the
    difference is not positive)."""
    decode_s = new_s - ttft_s
    return batch * (new - 1) / decode_s if decode_s > 0 else float("nan")


def _gpu():
    """The visible GPU's name, or None (then everything runs on the CPU)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return None


def _peak_mb():
    if os.environ["KERAS_BACKEND"] == "torch" and _gpu():
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    if os.environ["KERAS_BACKEND"] == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return stats["peak_bytes_in_use"] / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _config():
    from keras_gemma.presets import ARCHITECTURES

    return ARCHITECTURES["gemma3_270m"]


def _build_keras_gemma(dtype):
    import keras_gemma

    backbone = keras_gemma.GemmaBackbone(_config(), dtype=dtype)
    lm = keras_gemma.GemmaCausalLM(backbone)
    lm.compile(sampler="greedy")

    def generate(token_ids, padding_mask, new):
        return lm.generate({"token_ids": token_ids, "padding_mask": padding_mask}, max_new_tokens=new, stop_token_ids=None)

    return generate


def _keras_hub_backbone(dtype):
    """keras-hub's `Gemma3Backbone` of the same config (random weights)."""
    import keras_hub

    config = _config()
    return keras_hub.models.Gemma3Backbone(
        vocabulary_size=config.vocabulary_size, image_size=None, num_layers=config.num_layers,
        num_query_heads=config.num_query_heads, num_key_value_heads=config.num_key_value_heads,
        hidden_dim=config.hidden_dim, intermediate_dim=config.intermediate_dim, head_dim=config.head_dim,
        query_head_dim_normalize=True, use_query_key_norm=True, use_post_ffw_norm=True,
        use_post_attention_norm=True, final_logit_soft_cap=None, attention_logit_soft_cap=None,
        use_sliding_window_attention=True, sliding_window_size=config.sliding_window_size,
        local_rope_scaling_factor=1.0, global_rope_scaling_factor=1.0, vision_encoder=None,
        layer_norm_epsilon=config.layer_norm_epsilon, dtype=dtype,
    )


def _build_keras_hub(dtype):
    import keras
    import keras_hub

    lm = keras_hub.models.Gemma3CausalLM(backbone=_keras_hub_backbone(dtype), preprocessor=None)
    lm.compile(sampler="greedy")
    # keras-hub's own compiled generate step (jit / tf.function / eager), as
    # `generate` calls it; `generate` itself trips over `images=None` in its
    # output when there is no preprocessor.
    generate_function = lm.make_generate_function()

    def generate(token_ids, padding_mask, new):
        import numpy as np

        batch, prompt = token_ids.shape
        ids = np.zeros((batch, prompt + new), np.int32)
        mask = np.zeros((batch, prompt + new), bool)
        ids[:, :prompt], mask[:, :prompt] = token_ids, padding_mask
        out = generate_function({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
        return keras.ops.convert_to_numpy(out["token_ids"])

    return generate


def _build_transformers(dtype, compiled=False):
    """transformers' `Gemma3ForCausalLM` of the same config (random
    weights): `generate`, greedy, exactly `new` tokens; `compiled`: with its
    static cache, the forward pass compiled (`torch.compile`, CUDA graphs on
    a GPU), as transformers documents for speed."""
    import torch
    import transformers

    from keras_gemma.checkpoints.huggingface import config_to_hf

    hf = config_to_hf(_config())
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).to(device=device, dtype=getattr(torch, dtype)).eval()
    options = {}
    if compiled:
        compile_config = transformers.CompileConfig(fullgraph=True)
        compile_config._compile_all_devices = True  # transformers compiles on CUDA only otherwise
        options = {"cache_implementation": "static", "compile_config": compile_config}

    def generate(token_ids, padding_mask, new):
        with torch.inference_mode():
            out = model.generate(
                input_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
                attention_mask=torch.tensor(padding_mask, dtype=torch.long, device=device),
                max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **options,
            )
            return out.cpu().numpy()

    return generate


def worker(args):
    os.environ["KERAS_BACKEND"] = args.backend
    sys.path.insert(0, ROOT)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np

    from examples._common import set_seed

    cases = QUICK_CASES if args.quick else CASES
    build = {
        "keras_gemma": _build_keras_gemma,
        "keras_hub": _build_keras_hub,
        "transformers": _build_transformers,
        "transformers_compiled": lambda dtype: _build_transformers(dtype, compiled=True),
    }[args.impl]
    for dtype in args.dtypes.split(","):
        generate = None  # the previous dtype's model goes before this one is built
        _peak_reset()
        set_seed(0)  # as keras.utils.set_random_seed, without importing TensorFlow
        start = time.perf_counter()
        generate = build(dtype)
        build_s = time.perf_counter() - start
        rng = np.random.default_rng(0)
        for name, batch, prompt, new in cases:
            _peak_reset()
            token_ids = rng.integers(10, 30_000, (batch, prompt)).astype(np.int32)
            padding_mask = np.ones((batch, prompt), bool)
            timings = {}
            for n in (1, new):
                start = time.perf_counter()
                generate(token_ids, padding_mask, n)  # compile (and warm up)
                timings[n] = [time.perf_counter() - start, float("inf")]  # first, best
            # The 1-token and n-token runs alternate, so a slow stretch of a
            # shared machine lands on both, not on one side of the difference.
            for _ in range(args.repeats):
                for n in (1, new):
                    start = time.perf_counter()
                    generate(token_ids, padding_mask, n)
                    timings[n][1] = min(timings[n][1], time.perf_counter() - start)
            result = {
                "backend": args.backend, "impl": args.impl, "dtype": dtype, "case": name,
                "batch": batch, "prompt": prompt, "new": new,
                "ttft_s": timings[1][1], "new_s": timings[new][1],
                "decode_tok_s": _decode_rate(batch, new, timings[new][1], timings[1][1]),
                "compile_s": timings[new][0] - timings[new][1] + timings[1][0] - timings[1][1],
                "peak_mb": _peak_mb(), "build_s": build_s,
            }
            print("RESULT " + json.dumps(result), flush=True)


# -- driver ------------------------------------------------------------------------


def _format_table(results):
    """One row per implementation and case; a peer's row gives keras_gemma's
    decode speedup over it and keras_gemma's TTFT as a fraction of its."""
    rows = []
    header = ("backend", "dtype", "case", "batch", "impl", "decode tok/s", "TTFT s", "peak MB",
              "keras_gemma speedup", "keras_gemma TTFT ratio")
    index = {(r["backend"], r["dtype"], r["case"], r["batch"], r["impl"]): r for r in results}
    order = {impl: i for i, impl in enumerate(IMPLS + TRANSFORMERS)}
    for r in sorted(results, key=lambda r: (r["backend"], r["dtype"], r["batch"], r["prompt"], order[r["impl"]])):
        ours = index.get((r["backend"], r["dtype"], r["case"], r["batch"], "keras_gemma"))
        speedup = ttft = ""
        if ours is not None and r is not ours:
            speedup = f"{ours['decode_tok_s'] / r['decode_tok_s']:.2f}x"
            ttft = f"{ours['ttft_s'] / r['ttft_s']:.2f}"
        rows.append((
            r["backend"], r["dtype"], f"{r['case']} (p={r['prompt']}, n={r['new']})", str(r["batch"]), r["impl"],
            f"{r['decode_tok_s']:.1f}", f"{r['ttft_s']:.3f}", f"{r['peak_mb']:.0f}", speedup, ttft,
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    return "\n".join(out)


def _run_worker(args, backend, impl, round_index):
    """One worker subprocess: every case of one implementation on one backend."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--backend", backend, "--impl", impl,
               "--dtypes", args.dtypes, "--repeats", str(args.repeats)] + (["--quick"] if args.quick else [])
    start = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    found = [json.loads(l[7:]) for l in process.stdout.splitlines() if l.startswith("RESULT ")]
    tag = f" round {round_index + 1}" if args.rounds > 1 else ""
    for r in found:
        print(f"  {backend:10s} {impl:21s} {r['dtype']:8s} {r['case']:9s} b={r['batch']}: "
              f"{r['decode_tok_s']:7.1f} tok/s  TTFT {r['ttft_s']:.3f} s  peak {r['peak_mb']:.0f} MB  "
              f"(compile {r['compile_s']:.1f} s){tag}", flush=True)
    if process.returncode:
        print(f"  {backend} {impl} failed ({process.returncode}):\n" + process.stderr[-3000:], flush=True)
    print(f"# {backend} {impl}{tag}: {time.perf_counter() - start:.0f} s", flush=True)
    return found


def _best_of_rounds(rounds):
    """Per (backend, implementation, dtype, case): the lowest 1-token and
    `new`-token times over the rounds, the decode rate from those two (as a
    worker does over its repeats), and the highest peak memory.

    Not the highest per-round decode rate: a round whose 1-token call ran
    slow has a small difference `t(new) - t(1)`, so an inflated rate (one
    such round gave 34.7 tok/s after a 512-token prompt against 25.4 in the
    next, with TTFT 0.93 against 0.76 s).

    The rounds alternate the implementations' workers, so a slow stretch of
    a shared machine (this 2-core one moved 10-30% within minutes) lands on
    both sides rather than on whichever ran during it."""
    best = {}
    for found in rounds:
        for r in found:
            key = (r["backend"], r["impl"], r["dtype"], r["case"], r["batch"])
            if key not in best:
                best[key] = dict(r)
                continue
            kept = best[key]
            for field, pick in (("new_s", min), ("ttft_s", min), ("peak_mb", max)):
                kept[field] = pick(kept[field], r[field])
    for r in best.values():
        r["decode_tok_s"] = _decode_rate(r["batch"], r["new"], r["new_s"], r["ttft_s"])
    return list(best.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--quick", action="store_true", help="batch 1, short and 512-token prompts, fewer tokens")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per measurement (best is kept)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every implementation's worker this many times, alternating; report each case's best")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick and args.dtypes == ",".join(DTYPES):
        args.dtypes = "float32"
    if args.worker:
        return worker(args)

    load = os.getloadavg()[0]
    print(f"# {os.cpu_count()} CPUs, load average at start {load:.2f}" + ("  (busy machine: numbers are noisy)" if load > 1.0 else ""))
    unknown = set(args.impls.split(",")) - set(IMPLS + TRANSFORMERS)
    if unknown:
        parser.error(f"unknown --impls {sorted(unknown)}; choose from {', '.join(IMPLS + TRANSFORMERS)}")
    if _gpu():
        print(f"# on the GPU: {_gpu()}")
    rounds = []
    for round_index in range(args.rounds):
        found = []
        for backend in args.backends.split(","):
            for impl in args.impls.split(","):
                if impl in TRANSFORMERS and backend != "torch":
                    continue  # transformers is PyTorch's
                found += _run_worker(args, backend, impl, round_index)
        rounds.append(found)
    results = _best_of_rounds(rounds)
    print(f"\n# load average at end {os.getloadavg()[0]:.2f}")
    if args.rounds > 1:
        print(f"# best of {args.rounds} rounds per implementation and case")
    print(_format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
