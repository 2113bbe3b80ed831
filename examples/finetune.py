"""LoRA-tunes Gemma on a small instruction set and shows what changed.

    KERAS_BACKEND=jax python examples/finetune.py
    python examples/finetune.py --backend jax --steps 200 --rank 16 --save-lora /tmp/gemma_lora.npz
    python examples/chat.py --lora /tmp/gemma_lora.npz        # chat with the result

The data (`examples/data/instructions.jsonl`, about 300 short questions with
a held-out split) asks for capitals, unit conversions, arithmetic, opposites,
plurals and past-tense rewrites, always answered in one sentence in the same
house style. The default model, the real Gemma 3 270M base model, has never
seen Gemma's chat format: before tuning it rambles past the question; after a
few minutes on CPU it answers in the trained style and ends its turn.

It prints the held-out loss (mean negative log-likelihood per answer token)
and the answers to the same held-out questions before and after, with Keras'
progress bar in between. Only the LoRA adapters train (`enable_lora`); the
270M base weights stay frozen.
"""

import json
import os
import time

import numpy as np

import _common

DATA = os.path.join(_common.EXAMPLES_DIR, "data", "instructions.jsonl")


def parse_args(argv=None):
    parser = _common.parser(__doc__.splitlines()[0])
    _common.add_model_flags(parser)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step")
    parser.add_argument("--sequence-length", type=int, default=36, help="tokens per training example (prompt + answer)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW's learning rate")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 * rank)")
    parser.add_argument("--target-layers", default="query,value", help='comma-separated projections, or "all"')
    parser.add_argument("--data", default=DATA, help="a .jsonl file of {prompt, response, split}")
    parser.add_argument("--eval-examples", type=int, default=None, help="held-out examples for the loss (default: all)")
    parser.add_argument("--show", type=int, default=6, help="held-out questions answered before and after")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="tokens per shown answer")
    parser.add_argument("--save-lora", default=None, help="write the trained adapter here (a .npz file)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the LoRA weights and the data order")
    return parser.parse_args(argv)


def load_data(path):
    """(train, test): lists of rows `{prompt, response, category, split}`."""
    splits = {"train": [], "test": []}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                splits[row.get("split", "train")].append(row)
    return splits["train"], splits["test"]


def conversation(row):
    """A user turn and the answer, for Gemma's chat template."""
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


def one_per_category(rows, count):
    """Up to `count` rows, taking each category in turn."""
    by_category = {}
    for row in rows:
        by_category.setdefault(row.get("category"), []).append(row)
    picked = []
    for i in range(max(map(len, by_category.values()), default=0)):
        picked += [group[i] for group in by_category.values() if i < len(group)]
    return picked[:count]


def held_out_loss(lm, rows, batch_size):
    """Mean negative log-likelihood per trained token (the answers and their
    `<end_of_turn>`), over `rows`."""
    from keras import ops

    x, y, weights = lm.preprocessor([conversation(row) for row in rows])
    total, count = 0.0, 0.0
    for start in range(0, len(y), batch_size):
        rows = slice(start, start + batch_size)
        logits = lm({key: value[rows] for key, value in x.items()})  # (b, t, vocab) float32
        log_probs = ops.log_softmax(logits, axis=-1)
        picked = ops.take_along_axis(log_probs, ops.convert_to_tensor(y[rows][..., None]), axis=-1)[..., 0]
        total -= float(np.sum(ops.convert_to_numpy(picked) * weights[rows]))
        count += float(np.sum(weights[rows]))
    return total / count


def answers(lm, rows, max_new_tokens):
    return [lm.chat(row["prompt"], max_new_tokens=max_new_tokens).strip() for row in rows]


def training_stream(train, steps, batch_size, seed):
    """`steps * batch_size` examples: shuffled passes over `train`."""
    rng = np.random.default_rng(seed)
    needed = steps * batch_size
    order = np.concatenate([rng.permutation(len(train)) for _ in range(-(-needed // len(train)))])[:needed]
    return [conversation(train[i]) for i in order]


def main(argv=None, lm=None):
    args = parse_args(argv)
    if lm is None:
        _common.stderr(f"Starting {args.backend or _common.configured_backend()} (importing Keras) ...")
    _common.set_backend(args.backend)
    import keras

    from keras_gemma.losses import CausalLMAccuracy

    _common.set_seed(args.seed)
    log = _common.stderr
    if lm is None:
        lm = _common.load_model(args.preset, args.dtype, log=log)
    lm.preprocessor.sequence_length = args.sequence_length

    train, test = load_data(args.data)
    evaluated = test[: args.eval_examples] if args.eval_examples else test
    shown = one_per_category(test, args.show)
    print(f"{len(train)} training and {len(test)} held-out examples from {os.path.relpath(args.data)}", flush=True)

    start = time.perf_counter()
    loss_before = held_out_loss(lm, evaluated, args.batch_size)
    answers_before = answers(lm, shown, args.max_new_tokens)
    print(f"Held-out loss before tuning: {loss_before:.3f} ({len(evaluated)} examples, "
          f"{time.perf_counter() - start:.0f} s with the answers below)", flush=True)

    targets = "all" if args.target_layers == "all" else tuple(args.target_layers.split(","))
    alpha = args.alpha if args.alpha is not None else 2.0 * args.rank
    lm.backbone.enable_lora(args.rank, alpha=alpha, target_layers=targets)
    trainable = sum(int(np.prod(v.shape)) for v in lm.backbone.trainable_weights)
    print(f"LoRA rank {args.rank} (alpha {alpha:g}) on {targets}: {trainable:,} trainable parameters "
          f"of {lm.backbone.count_params():,}", flush=True)
    lm.compile(
        optimizer=keras.optimizers.AdamW(args.learning_rate, weight_decay=0.0),
        # The default loss and accuracy: computed a chunk of tokens at a
        # time, never holding the (batch, length, vocabulary) logits.
        weighted_metrics=[CausalLMAccuracy(name="accuracy")],
        sampler="greedy",
    )

    start = time.perf_counter()
    data = training_stream(train, args.steps, args.batch_size, args.seed)
    lm.fit(data, batch_size=args.batch_size, epochs=1, shuffle=False, verbose=1)
    train_seconds = time.perf_counter() - start

    loss_after = held_out_loss(lm, evaluated, args.batch_size)
    answers_after = answers(lm, shown, args.max_new_tokens)
    print(f"\nHeld-out loss: {loss_before:.3f} before, {loss_after:.3f} after {args.steps} steps "
          f"({train_seconds:.0f} s of training)")
    for row, before, after in zip(shown, answers_before, answers_after):
        print(f"\nQ: {row['prompt']}")
        print(f"   before: {before!r}")
        print(f"   after:  {after!r}")
        print(f"   target: {row['response']!r}")
    if args.save_lora:
        lm.backbone.save_lora_weights(args.save_lora)
        print(f"\nSaved the adapter to {args.save_lora}; try: python examples/chat.py --lora {args.save_lora}")
    return {"loss_before": loss_before, "loss_after": loss_after, "answers_before": answers_before, "answers_after": answers_after}


if __name__ == "__main__":
    main()
