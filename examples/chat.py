"""A multi-turn chat with Gemma in the terminal.

Each reply streams as it is decoded, and the whole conversation is sent back
to the model every turn (Gemma's chat template), so it remembers what was said.
Type `/reset` to start over, `/quit` (or Ctrl-D) to leave.

    python examples/chat.py
    python examples/chat.py --system "Answer in one sentence." --sampler top_k --temperature 0.7
    python examples/chat.py --lora /tmp/gemma_lora.npz        # after finetune.py --save-lora

Non-interactive (CI, scripts): give the turns with --message, or pipe them in
one per line when stdin is not a terminal.

    python examples/chat.py --message "What is the capital of Kenya?" --message "And of Peru?"
    printf 'Hi!\\n/reset\\nName a colour.\\n' | python examples/chat.py

The default model is the real Gemma 3 270M GGUF from the PyPI package, a base
(pretrained, not instruction-tuned) model, and the chat says so when it
starts: it has never seen the chat format, so its replies are short, odd or
off-topic (a reply ends where the model opens the next turn, so it does not
go on to write your lines). `finetune.py --save-lora` teaches it in a few
minutes; an instruction-tuned checkpoint (`--preset gemma3_instruct_270m`, or
`--preset path/to/gemma-3-1b-it.gguf`) chats as is.
"""

import sys
import warnings

import _common


def parse_args(argv=None):
    parser = _common.parser(__doc__.splitlines()[0])
    _common.add_model_flags(parser)
    parser.add_argument("--message", action="append", default=None, help="a user turn (repeat for several); no prompt is read")
    parser.add_argument("--system", default=None, help="a system instruction (folded into the first user turn)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="the most tokens per reply")
    parser.add_argument("--lora", default=None, help="a LoRA adapter saved by finetune.py --save-lora")
    _common.add_sampler_flags(parser)
    return parser.parse_args(argv)


class Conversation:
    """The turns so far, and the model that answers them."""

    def __init__(self, lm, system=None, max_new_tokens=128):
        self.lm = lm
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.messages = []
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text, out=sys.stdout):
        """Streams the model's answer to `text` to `out`; returns it and keeps both turns."""
        self.messages.append({"role": "user", "content": text})
        pieces = []
        for piece in self.lm.stream_chat(self.messages, max_new_tokens=self.max_new_tokens):
            pieces.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        answer = "".join(pieces).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def turns(messages, interactive):
    """User inputs: the --message flags, else input() prompts or stdin lines."""
    if messages:
        yield from messages
        return
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            return
        if not interactive and not line:
            return  # end of piped input
        yield line.strip()


def run(conversation, messages=None, interactive=None, out=sys.stdout):
    """Runs the chat loop; returns the model's replies."""
    if interactive is None:
        interactive = messages is None and sys.stdin.isatty()
    if interactive:
        _common.stderr("Chatting with Gemma. /reset starts over, /quit leaves.")
    replies = []
    for text in turns(messages, interactive):
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            conversation.reset()
            out.write("[conversation reset]\n")
            continue
        if not interactive:
            out.write(f"you> {text}\n")
        out.write("gemma> ")
        try:
            replies.append(conversation.reply(text, out=out))
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat
            conversation.messages.pop()  # the unanswered user turn
            out.write("\n[reply interrupted]\n")
    return replies


def say_if_base_model(lm):
    """`chat`'s base-model warning, once, as a plain line on stderr before the
    first turn (instead of a Python warning in the middle of the first reply)."""
    from keras_gemma.generation.api import base_model_warning

    message = base_model_warning(lm)
    if message:
        _common.stderr(f"Note: {message}")
        warnings.filterwarnings("ignore", message=r".* is a base \(pretrained\) model", category=UserWarning)


def main(argv=None, lm=None):
    args = parse_args(argv)
    lm = _common.prepare_model(args, lm)
    say_if_base_model(lm)
    conversation = Conversation(lm, system=args.system, max_new_tokens=args.max_new_tokens)
    return run(conversation, args.message)


if __name__ == "__main__":
    main()
