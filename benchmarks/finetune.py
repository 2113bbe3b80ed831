"""LoRA fine-tuning speed and memory: keras_gemma against keras-hub, per backend.

One run prints, for each (backend, implementation), the time of a `fit` step,
tokens per second and the process's peak memory, on Gemma 3 270M shapes
with random weights (the same seed for both; speed does not depend on the
values): LoRA (rank 4 on query and value by default), Adam, float32, batch
x sequence random token ids. keras-hub is `Gemma3CausalLM` on a
`Gemma3Backbone` of the same config with `backbone.enable_lora(rank,
target_layer_names=...)`; keras_gemma is `GemmaCausalLM` compiled with its
default loss (the chunked cross-entropy, `keras_gemma.losses`), and
`keras_gemma_remat` the same with `GemmaBackbone(remat="blocks")`.

Protocol, as `benchmarks/generate.py`: each (backend, implementation) in its
own subprocess; a first `fit` of one step compiles; then `--repeats` fits of
`--steps` steps each are timed, best kept. Peak memory is VmHWM reset after
the model is built (so it counts compilation, the optimizer's state and the
step), as `generate.py` measures it. With `--rounds N` workers alternate and
the best step time and highest peak over the rounds are kept.

Usage:
    python benchmarks/finetune.py --backends jax --rounds 2          # the issue's case
    python benchmarks/finetune.py --batch 1 --seq 2048 --rank 8 --targets all --impls keras_gemma_remat
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from generate import _config, _keras_hub_backbone, _peak_mb, _peak_reset  # noqa: E402

BACKENDS = ("jax", "tensorflow", "torch")
IMPLS = ("keras_gemma", "keras_gemma_remat", "keras_hub")
HUB_TARGETS = {"query": "query", "key": "key", "value": "value", "output": "attention_output",
               "gate": "ffw_gating", "up": "ffw_gating_2", "down": "ffw_linear"}


def _targets(args):
    return tuple(HUB_TARGETS) if args.targets == "all" else tuple(args.targets.split(","))


def _keras_gemma_model(args, remat=None):
    import keras
    import keras_gemma

    backbone = keras_gemma.GemmaBackbone(_config(), dtype="float32", remat=remat)
    backbone.enable_lora(args.rank, target_layers=_targets(args))
    lm = keras_gemma.GemmaCausalLM(backbone)
    lm.compile(optimizer=keras.optimizers.Adam(1e-4))
    return lm


def _keras_hub_model(args):
    import keras
    import keras_hub

    backbone = _keras_hub_backbone("float32")
    backbone.enable_lora(args.rank, target_layer_names=[HUB_TARGETS[t] for t in _targets(args)])
    lm = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
    lm.compile(optimizer=keras.optimizers.Adam(1e-4))  # keras-hub's default loss and accuracy metric
    return lm


def worker(args):
    os.environ["KERAS_BACKEND"] = args.backend
    sys.path.insert(0, ROOT)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np

    from examples._common import set_seed

    set_seed(0)  # as keras.utils.set_random_seed, without importing TensorFlow (its memory would count)
    lm = {
        "keras_gemma": _keras_gemma_model,
        "keras_gemma_remat": lambda args: _keras_gemma_model(args, remat="blocks"),
        "keras_hub": _keras_hub_model,
    }[args.impl](args)
    trainable = sum(int(np.prod(v.shape)) for v in lm.trainable_variables)
    rng = np.random.default_rng(0)
    rows = args.batch * args.steps
    ids = rng.integers(10, 30_000, (rows, args.seq + 1)).astype(np.int32)
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones((rows, args.seq), bool)}
    y, weights = ids[:, 1:], np.ones((rows, args.seq), np.float32)
    _peak_reset()
    start = time.perf_counter()
    first = lm.fit({k: v[: args.batch] for k, v in x.items()}, y[: args.batch], sample_weight=weights[: args.batch],
                   batch_size=args.batch, epochs=1, verbose=0)
    compile_s = time.perf_counter() - start
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        lm.fit(x, y, sample_weight=weights, batch_size=args.batch, epochs=1, verbose=0)
        best = min(best, (time.perf_counter() - start) / args.steps)
    result = {
        "backend": args.backend, "impl": args.impl, "batch": args.batch, "seq": args.seq, "rank": args.rank,
        "targets": args.targets, "step_s": best, "tokens_per_s": args.batch * args.seq / best,
        "peak_mb": _peak_mb(), "compile_s": compile_s - best, "first_loss": first.history["loss"][0],
        "trainable": trainable,
    }
    print("RESULT " + json.dumps(result), flush=True)


def _run_worker(args, backend, impl):
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--backend", backend, "--impl", impl]
    for name in ("batch", "seq", "rank", "targets", "steps", "repeats"):
        command += [f"--{name}", str(getattr(args, name))]
    process = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    found = [json.loads(line[7:]) for line in process.stdout.splitlines() if line.startswith("RESULT ")]
    for r in found:
        print(f"  {backend:10s} {impl:11s} step {r['step_s']:.2f} s  {r['tokens_per_s']:.0f} tok/s  "
              f"peak {r['peak_mb']:.0f} MB  (compile {r['compile_s']:.1f} s, first loss {r['first_loss']:.3f})", flush=True)
    if process.returncode:
        print(f"  {backend} {impl} failed ({process.returncode}):\n" + process.stderr[-3000:], flush=True)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--targets", default="query,value", help='comma-separated, or "all"')
    parser.add_argument("--steps", type=int, default=2, help="steps per timed fit")
    parser.add_argument("--repeats", type=int, default=2, help="timed fits (best is kept)")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the workers this many times; keep the best")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    print(f"# {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}")
    best = {}
    for round_index in range(args.rounds):
        for backend in args.backends.split(","):
            for impl in args.impls.split(","):
                for r in _run_worker(args, backend, impl):
                    kept = best.setdefault((backend, impl), r)
                    kept["step_s"] = min(kept["step_s"], r["step_s"])
                    kept["peak_mb"] = max(kept["peak_mb"], r["peak_mb"])
                    kept["tokens_per_s"] = r["batch"] * r["seq"] / kept["step_s"]
    print(f"\n# load average at end {os.getloadavg()[0]:.2f}; batch {args.batch} x {args.seq}, LoRA rank {args.rank} "
          f"on {args.targets}, Adam, float32")
    print("| backend | impl | step s | tokens/s | peak MB | step ratio | peak ratio |")
    print("|---|---|---|---|---|---|---|")
    for (backend, impl), r in best.items():
        hub = best.get((backend, "keras_hub"))
        ratios = ("", "")
        if impl.startswith("keras_gemma") and hub is not None:
            ratios = (f"{r['step_s'] / hub['step_s']:.2f}x", f"{r['peak_mb'] / hub['peak_mb']:.2f}x")
        print(f"| {backend} | {impl} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_mb']:.0f} | {ratios[0]} | {ratios[1]} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(list(best.values()), f, indent=1)


if __name__ == "__main__":
    main()
