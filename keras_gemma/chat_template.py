"""Gemma's chat formats, written in Python.

Renders character for character what the Hugging Face Jinja templates of the
instruction-tuned Gemma models render (see `tests/test_chat_template.py` and
`tests/test_gemma4_chat.py`). Each format is a `ChatFormat`, data that the
tokenizer carries (read from its vocabulary or its checkpoint's chat
template), never a version check:

`GEMMA` (Gemma 1, 2 and 3)::

    <bos><start_of_turn>user
    {user text, trimmed}<end_of_turn>
    <start_of_turn>model
    {model text, trimmed}<end_of_turn>
    <start_of_turn>model          <- the generation prompt

A `system` message may only come first; it is folded into the first user turn
as `{system}\\n\\n{user}` (Gemma 3's rule; the Gemma 2 template rejects it,
pass `allow_system=False` for that). Roles must alternate user/model.

`GEMMA4` (Gemma 4 12B, 26B, 31B; `GEMMA4_E` for E2B and E4B, whose
generation prompt has no empty thought)::

    <bos><|turn>system
    <|think|>                     <- only with enable_thinking=True
    {system text, trimmed}<turn|>
    <|turn>user
    {user text, trimmed}<turn|>
    <|turn>model
    {model text, thoughts removed, trimmed}<turn|>
    <|turn>model
    <|channel>thought
    <channel|>                    <- generation prompt; the empty thought
                                     only with enable_thinking=False

The system prompt has a turn of its own; the template neither requires
alternating roles nor a user turn. In both formats `assistant` is written
`model`.
"""

import dataclasses

BOS = "<bos>"


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """How one Gemma generation writes a conversation.

    Attributes:
        name: the name a tokenizer's `chat_format` is given by.
        start_of_turn: opens a turn, followed by the role and "\\n".
        end_of_turn: closes a turn (followed by "\\n"); generation stops on it.
        roles: the roles a message may have.
        native_system: a leading system message gets a turn of its own and
            roles may come in any order; otherwise the system text is folded
            into the first user turn and roles alternate user/model.
        think_token: written first in the system turn when thinking is on;
            None: the format has no thinking mode.
        thought_channel: `(open, close)` markers of the model's thoughts,
            removed from model turns given back in a conversation.
        no_thinking_prompt: written after the generation prompt when thinking
            is off (an empty, closed thought).
    """

    name: str
    start_of_turn: str
    end_of_turn: str
    roles: tuple
    native_system: bool = False
    think_token: str = None
    thought_channel: tuple = None
    no_thinking_prompt: str = ""

    @property
    def generation_prompt(self):
        return f"{self.start_of_turn}model\n"


GEMMA = ChatFormat(
    name="gemma",
    start_of_turn="<start_of_turn>",
    end_of_turn="<end_of_turn>",
    roles=("user", "assistant", "model", "system"),
)

# From google/gemma-4-31B-it's chat_template.jinja, as llama.cpp keeps it
# (ggml-org/llama.cpp models/templates/google-gemma-4-31B-it-interleaved.jinja,
# commit 3240d8f92c08e9db0be78358b29e06a1f531fe33); its text-only, tool-less
# part is quoted in tests/test_gemma4_chat.py and rendered there by
# transformers. Tools, images and audio are not covered.
GEMMA4 = ChatFormat(
    name="gemma4",
    start_of_turn="<|turn>",
    end_of_turn="<turn|>",
    roles=("user", "assistant", "model", "system", "developer"),
    native_system=True,
    think_token="<|think|>",
    thought_channel=("<|channel>", "<channel|>"),
    no_thinking_prompt="<|channel>thought\n<channel|>",
)

# Gemma 4 E2B and E4B: the same, but the generation prompt carries no empty
# thought when thinking is off: their chat_template.jinja lacks the
# `<|channel>thought\n<channel|>` primer of the 12B, 26B and 31B ones (as
# third-party Gemma 4 runtimes record; their own template text was not at hand).
GEMMA4_E = dataclasses.replace(GEMMA4, name="gemma4_e", no_thinking_prompt="")

CHAT_FORMATS = {fmt.name: fmt for fmt in (GEMMA, GEMMA4, GEMMA4_E)}

# Gemma 1-3 names, kept for callers that import them.
START_OF_TURN = GEMMA.start_of_turn
END_OF_TURN = GEMMA.end_of_turn
ROLES = GEMMA.roles
GENERATION_PROMPT = GEMMA.generation_prompt


def get_chat_format(chat_format):
    """A `ChatFormat` from itself or its name ("gemma", "gemma4", "gemma4_e")."""
    if isinstance(chat_format, ChatFormat):
        return chat_format
    if chat_format not in CHAT_FORMATS:
        raise ValueError(
            f"Unknown chat format {chat_format!r}; expected one of "
            f"{', '.join(sorted(CHAT_FORMATS))}."
        )
    return CHAT_FORMATS[chat_format]


def chat_format_for_template(template):
    """The format a Jinja chat template (a checkpoint's `chat_template.jinja`
    or `tokenizer_config.json` "chat_template") writes, or None for one that
    is none of Gemma's."""
    if GEMMA4.start_of_turn in template:
        # The primer is a Jinja string literal: "\\n" as written in the file.
        primer = GEMMA4.no_thinking_prompt
        has_primer = primer in template or primer.replace("\n", "\\n") in template
        return GEMMA4 if has_primer else GEMMA4_E
    if GEMMA.start_of_turn in template:
        return GEMMA
    return None


def chat_format_for_vocabulary(pieces):
    """The format whose turn markers a vocabulary holds (Gemma 4's `<|turn>`
    first: its vocabulary may keep the older markers too)."""
    for fmt in (GEMMA4, GEMMA):
        if fmt.start_of_turn in pieces and fmt.end_of_turn in pieces:
            return fmt
    return GEMMA


def _content_text(message, index):
    """The text of a message: a str, or a list of `{"type": "text"}` parts."""
    if not isinstance(message, dict):
        raise ValueError(
            f"Message {index} must be a dict with 'role' and 'content', "
            f"got {type(message).__name__}: {message!r}"
        )
    if "content" not in message or message["content"] is None:
        raise ValueError(f"Message {index} has no 'content': {message!r}")
    content = message["content"]
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ValueError(
                    f"Message {index}: only text content parts are supported "
                    f"(text-only Gemma), got {part!r}"
                )
            texts.append(part["text"])
        return texts
    raise ValueError(
        f"Message {index} 'content' must be a string, got "
        f"{type(content).__name__}: {content!r}"
    )


def _trim(text):
    # Jinja's `trim` filter is Python's `str.strip()`.
    if isinstance(text, list):  # Gemma 3 and 4 trim each text part on its own
        return "".join(part.strip() for part in text)
    return text.strip()


def _strip_thoughts(text, chat_format):
    """Model text without its thoughts (`<|channel>...<channel|>`), trimmed:
    the Gemma 4 template's `strip_thinking` macro."""
    if isinstance(text, list):
        return "".join(_strip_thoughts(part, chat_format) for part in text)
    open_, close = chat_format.thought_channel
    kept = [part.split(open_)[0] for part in text.split(close)]
    return "".join(kept).strip()


def split_thinking(reply, chat_format=GEMMA4):
    """`(thinking, answer)` of a reply made with thinking on: the text inside
    the thought channel (`<|channel>thought\\n...<channel|>`, its "thought"
    header dropped; a thought cut short counts too) and the rest, trimmed, as
    the template writes it back into a conversation. `thinking` is "" when
    there is none.

    Example:

    ```python
    split_thinking("<|channel>thought\\nAdd them.<channel|>4")  # ("Add them.", "4")
    ```
    """
    chat_format = get_chat_format(chat_format)
    if chat_format.thought_channel is None:
        return "", reply.strip()
    open_, close = chat_format.thought_channel
    thoughts, answer = [], []
    for part in reply.split(close):
        if open_ in part:  # a thought, closed or cut short
            before, thought = part.split(open_, 1)
            answer.append(before)
            thoughts.append(thought.removeprefix("thought").strip())
        else:
            answer.append(part)
    return "\n".join(thoughts), "".join(answer).strip()


def _check_messages(messages, chat_format):
    if isinstance(messages, dict) or not isinstance(messages, (list, tuple)):
        raise ValueError(
            "A conversation must be a list of {'role', 'content'} dicts, got "
            f"{type(messages).__name__}."
        )
    if not messages:
        raise ValueError("The conversation is empty: it needs at least one message.")
    for index, message in enumerate(messages):
        _content_text(message, index)  # checks dict and content
        role = message.get("role")
        if role not in chat_format.roles:
            raise ValueError(
                f"Message {index} has unknown role {role!r}; expected one of "
                f"{', '.join(chat_format.roles)}."
            )


def chat_turns(messages, allow_system=True, chat_format=GEMMA, enable_thinking=False):
    """Validates a conversation and returns its turns as `(role, text)` pairs.

    Roles come out as written in the chat text (`"user"`, `"model"`, and for
    Gemma 4 `"system"`); texts are trimmed. With `GEMMA` a leading system
    message is already folded into the first user text; with `GEMMA4` it is
    a turn of its own, which also carries `<|think|>` when `enable_thinking`.

    Raises:
        ValueError: empty conversation, a message that is not a dict, missing
            content, an unknown role; with `GEMMA`, a system message that is
            not first (or at all, with `allow_system=False`), roles that do
            not alternate user/model starting with user, or thinking asked
            for. The message names the bad index.
    """
    chat_format = get_chat_format(chat_format)
    if enable_thinking and chat_format.think_token is None:
        raise ValueError(
            f"The {chat_format.name!r} chat format has no thinking mode "
            "(enable_thinking=True)."
        )
    _check_messages(messages, chat_format)
    if chat_format.native_system:
        return _native_system_turns(messages, chat_format, enable_thinking)
    return _folded_system_turns(messages, chat_format, allow_system)


def _native_system_turns(messages, chat_format, enable_thinking):
    """Gemma 4: a system turn of its own, any order of roles."""
    turns = []
    first = 0
    system_text = ""
    if messages[0]["role"] in ("system", "developer"):
        if not isinstance(messages[0]["content"], str):
            # The template trims the content as a whole: a list would come
            # out as its Python repr.
            raise ValueError(
                "Message 0: the first system message's content must be a "
                f"string in the {chat_format.name!r} chat format."
            )
        system_text = messages[0]["content"].strip()
        first = 1
    if first or enable_thinking:
        think = chat_format.think_token + "\n" if enable_thinking else ""
        turns.append(("system", think + system_text))
    for index in range(first, len(messages)):
        role = messages[index]["role"]
        role = "model" if role == "assistant" else role
        text = _content_text(messages[index], index)
        if role == "model":
            turns.append((role, _strip_thoughts(text, chat_format)))
        else:
            turns.append((role, _trim(text)))
    return turns


def _folded_system_turns(messages, chat_format, allow_system):
    """Gemma 1-3: the system text opens the first user turn; roles alternate."""
    system_prefix = ""
    first = 0
    for index, message in enumerate(messages):
        if message["role"] != "system":
            continue
        if not allow_system:
            raise ValueError(
                f"Message {index}: this template does not support a system role."
            )
        if index != 0:
            raise ValueError(f"Message {index}: a system message may only come first.")
        text = _content_text(message, index)
        # Gemma 3's template does not trim the system text.
        system_prefix = (text if isinstance(text, str) else text[0]) + "\n\n"
        first = 1

    turns = []
    for index in range(first, len(messages)):
        message = messages[index]
        role = "model" if message["role"] == "assistant" else message["role"]
        expected = "user" if (index - first) % 2 == 0 else "model"
        if role != expected:
            raise ValueError(
                f"Message {index} has role {message['role']!r} but {expected!r} "
                "was expected: roles must alternate user/model, starting with "
                "user."
            )
        text = _trim(_content_text(message, index))
        if index == first:
            text = system_prefix + text
        turns.append((role, text))
    if not turns:
        raise ValueError("Message 0: a system message needs a user message after it.")
    return turns


def format_turn(role, text, chat_format=GEMMA):
    """One turn: `<start_of_turn>{role}\\n{text}<end_of_turn>\\n` (Gemma 4:
    `<|turn>{role}\\n{text}<turn|>\\n`)."""
    chat_format = get_chat_format(chat_format)
    return f"{chat_format.start_of_turn}{role}\n{text}{chat_format.end_of_turn}\n"


def generation_prompt(chat_format=GEMMA, enable_thinking=False):
    """What opens the model's reply: `<start_of_turn>model\\n`; Gemma 4 adds an
    empty thought when thinking is off."""
    chat_format = get_chat_format(chat_format)
    prompt = chat_format.generation_prompt
    return prompt if enable_thinking else prompt + chat_format.no_thinking_prompt


def apply_chat_template(
    messages,
    add_generation_prompt=True,
    bos_token=BOS,
    allow_system=True,
    chat_format=GEMMA,
    enable_thinking=False,
):
    """Renders a conversation as Gemma chat text.

    Args:
        messages: a list of `{"role": ..., "content": ...}` dicts; role is
            `"user"`, `"assistant"` (written `model`), `"model"` or
            `"system"` (Gemma 4 also `"developer"`). Content is a string (or
            a list of `{"type": "text", "text": ...}` parts, as in
            transformers).
        add_generation_prompt: end with the model's turn opening
            (`<start_of_turn>model\\n`) so the model answers next.
        bos_token: written first; pass `""` when the tokenizer adds `<bos>`.
        allow_system: `False` rejects system messages, like the Gemma 1/2
            template.
        chat_format: `GEMMA` (Gemma 1-3, the default), `GEMMA4`, or its
            name; a tokenizer knows its own (`tokenizer.chat_format`).
        enable_thinking: Gemma 4: `<|think|>` in the system turn, and no
            empty thought after the generation prompt, so the model thinks
            before it answers.

    Returns:
        The chat text (str).

    Raises:
        ValueError: bad conversation; the message names the bad index.

    Example:

    ```python
    apply_chat_template([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
    ])
    # '<bos><start_of_turn>user\\nBe brief.\\n\\nHi!<end_of_turn>\\n'
    # '<start_of_turn>model\\n'
    apply_chat_template([{"role": "user", "content": "Hi!"}], chat_format="gemma4")
    # '<bos><|turn>user\\nHi!<turn|>\\n<|turn>model\\n<|channel>thought\\n<channel|>'
    ```
    """
    chat_format = get_chat_format(chat_format)
    turns = chat_turns(messages, allow_system, chat_format, enable_thinking)
    text = bos_token + "".join(format_turn(role, body, chat_format) for role, body in turns)
    if add_generation_prompt:
        text += generation_prompt(chat_format, enable_thinking)
    return text


def is_conversation(value):
    """True for a list of message dicts (one conversation)."""
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(message, dict) for message in value)
    )


def is_conversation_batch(value):
    """True for a list of conversations."""
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(item, (list, tuple)) for item in value)
        and any(is_conversation(item) for item in value)
    )
