"""Gemma's chat format, written in Python.

Renders character for character what the Hugging Face Jinja templates of the
Gemma 2 and Gemma 3 instruction-tuned models render (see
`tests/test_chat_template.py`)::

    <bos><start_of_turn>user
    {user text, trimmed}<end_of_turn>
    <start_of_turn>model
    {model text, trimmed}<end_of_turn>
    <start_of_turn>model          <- the generation prompt

`assistant` is written `model`. A `system` message may only come first; it is
folded into the first user turn as `{system}\\n\\n{user}` (Gemma 3's rule; the
Gemma 2 template rejects it, pass `allow_system=False` for that).
"""

BOS = "<bos>"
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
ROLES = ("user", "assistant", "model", "system")


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
    if isinstance(text, list):  # Gemma 3 trims each text part on its own
        return "".join(part.strip() for part in text)
    return text.strip()


def chat_turns(messages, allow_system=True):
    """Validates a conversation and returns its turns as `(role, text)` pairs.

    Roles come out as `"user"` or `"model"`; texts are trimmed, and a leading
    system message is already folded into the first user text.

    Raises:
        ValueError: empty conversation, a message that is not a dict, missing
            content, an unknown role, a system message that is not first (or
            at all, with `allow_system=False`), or roles that do not alternate
            user/model starting with user. The message names the bad index.
    """
    if isinstance(messages, dict) or not isinstance(messages, (list, tuple)):
        raise ValueError(
            "A conversation must be a list of {'role', 'content'} dicts, got "
            f"{type(messages).__name__}."
        )
    if not messages:
        raise ValueError("The conversation is empty: it needs at least one message.")

    system_prefix = ""
    first = 0
    for index, message in enumerate(messages):
        text = _content_text(message, index)  # checks dict and content
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(
                f"Message {index} has unknown role {role!r}; expected one of "
                f"{', '.join(ROLES)}."
            )
        if role == "system":
            if not allow_system:
                raise ValueError(
                    f"Message {index}: this template does not support a "
                    "system role."
                )
            if index != 0:
                raise ValueError(
                    f"Message {index}: a system message may only come first."
                )
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
        raise ValueError(
            "Message 0: a system message needs a user message after it."
        )
    return turns


def format_turn(role, text):
    """One turn: `<start_of_turn>{role}\\n{text}<end_of_turn>\\n`."""
    return f"{START_OF_TURN}{role}\n{text}{END_OF_TURN}\n"


GENERATION_PROMPT = f"{START_OF_TURN}model\n"


def apply_chat_template(
    messages, add_generation_prompt=True, bos_token=BOS, allow_system=True
):
    """Renders a conversation as Gemma chat text.

    Args:
        messages: a list of `{"role": ..., "content": ...}` dicts; role is
            `"user"`, `"assistant"` (written `model`), `"model"` or
            `"system"` (first message only). Content is a string (or a list of
            `{"type": "text", "text": ...}` parts, as in transformers).
        add_generation_prompt: end with `<start_of_turn>model\\n` so the model
            answers next.
        bos_token: written first; pass `""` when the tokenizer adds `<bos>`.
        allow_system: `False` rejects system messages, like the Gemma 1/2
            template.

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
    ```
    """
    turns = chat_turns(messages, allow_system=allow_system)
    text = bos_token + "".join(format_turn(role, body) for role, body in turns)
    if add_generation_prompt:
        text += GENERATION_PROMPT
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
