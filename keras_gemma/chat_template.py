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

Gemma 4 also calls tools (`tools=` of `apply_chat_template`; the syntax is
in `keras_gemma/tool_calls.py`): the system turn declares them, a model turn
holds the model's calls and then their answers, and the model goes on in
that same turn after the answers::

    <|turn>system
    {system text}<|tool>declaration:get_weather{...}<tool|><turn|>
    <|turn>user
    Weather in Paris?<turn|>
    <|turn>model
    <|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>
                                  <- no generation prompt: the model goes on
"""

import dataclasses

from keras_gemma import tool_calls as tools_lib

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
        tools: the markers of tool declarations, calls and responses
            (`tool_calls.ToolSyntax`); None: the format has no tool calling.
    """

    name: str
    start_of_turn: str
    end_of_turn: str
    roles: tuple
    native_system: bool = False
    think_token: str = None
    thought_channel: tuple = None
    no_thinking_prompt: str = ""
    tools: tools_lib.ToolSyntax = None

    @property
    def generation_prompt(self):
        return f"{self.start_of_turn}model\n"

    @property
    def reply_markers(self):
        """Control tokens kept in a reply's text: thought and tool-call
        markers and the string quote, so `split_thinking` and
        `tool_calls.parse_tool_calls` can read the reply."""
        markers = self.thought_channel or ()
        if self.tools is not None:
            markers += self.tools.call + (self.tools.quote,)
        return markers


GEMMA = ChatFormat(
    name="gemma",
    start_of_turn="<start_of_turn>",
    end_of_turn="<end_of_turn>",
    roles=("user", "assistant", "model", "system"),
)

# google/gemma-4-31B-it's chat_template.jinja, as llama.cpp keeps it
# (models/templates/google-gemma-4-31B-it.jinja; a copy from the
# llama-cpp-python 0.3.36 sdist is tests/templates/gemma-4-31B-it.jinja, and
# tests/test_gemma4_chat.py and tests/test_gemma4_tools.py compare with
# transformers' rendering of it). Text and tools; images and audio are not
# covered.
GEMMA4 = ChatFormat(
    name="gemma4",
    start_of_turn="<|turn>",
    end_of_turn="<turn|>",
    roles=("user", "assistant", "model", "system", "developer"),
    native_system=True,
    think_token="<|think|>",
    thought_channel=("<|channel>", "<channel|>"),
    no_thinking_prompt="<|channel>thought\n<channel|>",
    tools=tools_lib.GEMMA4_TOOLS,
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


_TOOL_KEYS = ("tool_calls", "tool_responses")


def _tool_parts(message):
    """What of a message is about tools: its `tool_calls`, `tool_responses`
    and a `tool` role."""
    parts = [key for key in _TOOL_KEYS if message.get(key)]
    return parts + ["role 'tool'"] * (message.get("role") == "tool")


def _check_messages(messages, chat_format, allow_tools=False):
    if isinstance(messages, dict) or not isinstance(messages, (list, tuple)):
        raise ValueError(
            "A conversation must be a list of {'role', 'content'} dicts, got "
            f"{type(messages).__name__}."
        )
    if not messages:
        raise ValueError("The conversation is empty: it needs at least one message.")
    roles = chat_format.roles + ("tool",) * bool(allow_tools and chat_format.tools)
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            _content_text(message, index)  # raises: not a dict
        tool_parts = _tool_parts(message)
        if tool_parts and chat_format.tools is None:
            raise ValueError(
                f"Message {index} has {' and '.join(tool_parts)}: the {chat_format.name!r} chat "
                "format (Gemma 1-3) has no tool calling; tools need a Gemma 4 model ('gemma4')."
            )
        if tool_parts and not allow_tools:
            raise ValueError(
                f"Message {index} has {' and '.join(tool_parts)}: `chat_turns` covers "
                "conversations without tools; `apply_chat_template` and `chat_segments` "
                "write tool calls."
            )
        role = message.get("role")
        if role not in roles:
            raise ValueError(
                f"Message {index} has unknown role {role!r}; expected one of "
                f"{', '.join(roles)}."
            )
        if not tool_parts or role == "tool" or message.get("content") is not None:
            _content_text(message, index)  # checks the content


def chat_turns(messages, allow_system=True, chat_format=GEMMA, enable_thinking=False):
    """Validates a conversation and returns its turns as `(role, text)` pairs.

    Roles come out as written in the chat text (`"user"`, `"model"`, and for
    Gemma 4 `"system"`); texts are trimmed. With `GEMMA` a leading system
    message is already folded into the first user text; with `GEMMA4` it is
    a turn of its own, which also carries `<|think|>` when `enable_thinking`.
    Conversations without tools only; one turn per message (Gemma 4's text
    goes on in the same turn for a model message right after an assistant
    one: `chat_segments` follows the text exactly).

    Raises:
        ValueError: empty conversation, a message that is not a dict, missing
            content, an unknown role; with `GEMMA`, a system message that is
            not first (or at all, with `allow_system=False`), roles that do
            not alternate user/model starting with user, or thinking asked
            for. The message names the bad index.
    """
    chat_format = get_chat_format(chat_format)
    _check_thinking(chat_format, enable_thinking)
    _check_messages(messages, chat_format)
    if chat_format.native_system:
        return _native_system_turns(messages, chat_format, enable_thinking)
    return _folded_system_turns(messages, chat_format, allow_system)


def _check_thinking(chat_format, enable_thinking):
    if enable_thinking and chat_format.think_token is None:
        raise ValueError(
            f"The {chat_format.name!r} chat format has no thinking mode "
            "(enable_thinking=True)."
        )


def _system_text(message, chat_format):
    if not isinstance(message["content"], str):
        # The template trims the content as a whole: a list would come
        # out as its Python repr.
        raise ValueError(
            "Message 0: the first system message's content must be a "
            f"string in the {chat_format.name!r} chat format."
        )
    return message["content"].strip()


def _native_system_turns(messages, chat_format, enable_thinking):
    """Gemma 4: a system turn of its own, any order of roles."""
    turns = []
    first = 0
    system_text = ""
    if messages[0]["role"] in ("system", "developer"):
        system_text = _system_text(messages[0], chat_format)
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


def _tool_call(call, index, number):
    """`(name, arguments, id)` of one entry of a message's `tool_calls`:
    OpenAI's `{"id", "type": "function", "function": {"name", "arguments"}}`,
    or `{"name", "arguments"}` as `tool_calls.parse_tool_calls` gives it."""
    function = call.get("function", call) if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"Message {index}: tool call {number} must be {{'function': {{'name': ..., "
            f"'arguments': {{...}}}}}} or {{'name': ..., 'arguments': {{...}}}}, got {call!r:.200}."
        )
    return name, function.get("arguments"), call.get("id")


def _tool_message_body(message, index):
    """A `tool` message's content, as the template reads it: a string, or
    its text parts joined (no trimming)."""
    content = _content_text(message, index)
    return content if isinstance(content, str) else "".join(content)


def _tool_message_name(message, calls, index):
    """The function a `tool` message answers: the call whose `id` equals its
    `tool_call_id` (the template takes the last such call), else its `name`."""
    matches = [name for name, _, call_id in calls if call_id == message.get("tool_call_id")]
    if len(set(matches)) > 1:
        # Without ids every call matches, and the template would name every
        # response after the last call.
        raise ValueError(
            f"Message {index}: this tool response could answer calls to "
            f"{', '.join(sorted(set(matches)))}: give each tool call an 'id' and each 'tool' "
            "message the 'tool_call_id' of the call it answers."
        )
    name = matches[-1] if matches else message.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"Message {index}: a 'tool' message needs a 'tool_call_id' equal to the 'id' of "
            "the call it answers, or the function's 'name'."
        )
    return name


def _native_segments(messages, tools, chat_format, enable_thinking, add_generation_prompt):
    """Gemma 4's chat text as `(text, trained)` pieces, written as
    google/gemma-4-31B-it's template writes it; `trained` marks what the
    model writes (its text, thoughts, tool calls and turn ends)."""
    syntax = chat_format.tools
    out = []
    last = None  # the template's `prev_message_type`
    first = 0
    first_role = messages[0]["role"]
    if enable_thinking or tools or first_role in ("system", "developer"):
        head = chat_format.start_of_turn + "system\n"
        if enable_thinking:
            head += chat_format.think_token + "\n"
            last = "think"
        if first_role in ("system", "developer"):
            head += _system_text(messages[0], chat_format)
            first = 1
        for tool in tools:
            open_, close = syntax.declaration
            head += open_ + tools_lib.format_declaration(tool) + close
            last = "tool"
        out.append((head + chat_format.end_of_turn + "\n", False))
    users = [i for i in range(first, len(messages)) if messages[i]["role"] == "user"]
    last_user = users[-1] if users else -1
    previous = None  # the last message that is not a `tool` one
    for index in range(first, len(messages)):
        message = messages[index]
        if message["role"] == "tool":
            if previous is None or not previous.get("tool_calls") or previous.get("tool_responses"):
                raise ValueError(
                    f"Message {index}: a 'tool' message must follow an assistant message with "
                    "'tool_calls' (and no 'tool_responses'): its response is written into "
                    "that model turn."
                )
            continue  # written with the model turn it answers
        last = None
        role = "model" if message["role"] == "assistant" else message["role"]
        model = role == "model"
        # A model message right after an assistant one goes on in its turn.
        if not (model and previous is not None and previous["role"] == "assistant"):
            out.append((f"{chat_format.start_of_turn}{role}\n", False))
        previous = message
        raw_calls = message.get("tool_calls") or []
        if not isinstance(raw_calls, (list, tuple)):
            raise ValueError(f"Message {index}: 'tool_calls' must be a list, got {raw_calls!r:.200}.")
        calls = [_tool_call(call, index, number) for number, call in enumerate(raw_calls)]
        thinking = message.get("reasoning") or message.get("reasoning_content")
        if thinking and index > last_user and calls:
            open_, close = chat_format.thought_channel
            out.append((f"{open_}thought\n{thinking}\n{close}", model))
        for name, arguments, _ in calls:
            out.append((tools_lib.format_call(name, arguments, syntax), model))
            last = "tool_call"
        responses = []
        if message.get("tool_responses"):
            for number, response in enumerate(message["tool_responses"]):
                if not isinstance(response, dict) or "response" not in response:
                    raise ValueError(
                        f"Message {index}: tool response {number} must be {{'name': ..., "
                        f"'response': ...}}, got {response!r:.200}."
                    )
                responses.append((response.get("name", "unknown"), response["response"]))
        elif calls:
            for follow in range(index + 1, len(messages)):
                if messages[follow]["role"] != "tool":
                    break
                body = _tool_message_body(messages[follow], follow)
                responses.append((_tool_message_name(messages[follow], calls, follow), body))
        for number, (name, response) in enumerate(responses):
            block = tools_lib.format_response(name, response, syntax)
            if number == 0 and calls and model:
                # The model writes the opening marker itself and stops there.
                opening = syntax.response[0]
                out += [(opening, True), (block[len(opening):], False)]
            else:
                out.append((block, False))
            last = "tool_response"
        if message.get("content") is not None:
            text = _content_text(message, index)
            text = _strip_thoughts(text, chat_format) if model else _trim(text)
            if text:
                out.append((text, model))
        if last == "tool_call" and not responses:
            out.append((syntax.response[0], model))  # the model yields to the tool
        elif not (responses and not message.get("content")):
            out += [(chat_format.end_of_turn, model), ("\n", False)]
    if add_generation_prompt and last not in ("tool_response", "tool_call"):
        out.append((generation_prompt(chat_format, enable_thinking), False))
    return out


def chat_segments(
    messages,
    chat_format=GEMMA,
    tools=None,
    enable_thinking=False,
    add_generation_prompt=False,
    allow_system=True,
):
    """The chat text of a conversation as `(text, trained)` pieces, `<bos>`
    left out: joined, they are `apply_chat_template`'s text; `trained` marks
    what the model writes (its turns' text and end markers; Gemma 4 also its
    thoughts kept before tool calls, its tool calls and the
    `<|tool_response>` it stops on), the text a preprocessor trains on.

    Args: as in `apply_chat_template`.

    Raises:
        ValueError: as `apply_chat_template`.
    """
    chat_format = get_chat_format(chat_format)
    tools = tools_lib.check_tools(tools)
    if tools and chat_format.tools is None:
        raise ValueError(
            f"The {chat_format.name!r} chat format (Gemma 1-3) has no tool calling: "
            "`tools` need a Gemma 4 model (chat format 'gemma4')."
        )
    _check_thinking(chat_format, enable_thinking)
    _check_messages(messages, chat_format, allow_tools=True)
    if chat_format.native_system:
        return _native_segments(messages, tools, chat_format, enable_thinking, add_generation_prompt)
    out = []
    for role, text in _folded_system_turns(messages, chat_format, allow_system):
        if role == "model":
            out += [(chat_format.generation_prompt, False), (text + chat_format.end_of_turn, True), ("\n", False)]
        else:
            out.append((format_turn(role, text, chat_format), False))
    if add_generation_prompt:
        out.append((generation_prompt(chat_format, enable_thinking), False))
    return out


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
    tools=None,
):
    """Renders a conversation as Gemma chat text.

    Args:
        messages: a list of `{"role": ..., "content": ...}` dicts; role is
            `"user"`, `"assistant"` (written `model`), `"model"` or
            `"system"` (Gemma 4 also `"developer"` and `"tool"`). Content is
            a string (or a list of `{"type": "text", "text": ...}` parts, as
            in transformers).
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
        tools: Gemma 4: functions the model may call, as OpenAI-style
            `{"type": "function", "function": {"name", "description",
            "parameters": <JSON schema>}}` dicts, declared in the system
            turn. In the conversation an assistant message may carry
            `tool_calls` (`[{"id", "function": {"name", "arguments": {...}}}]`,
            or `[{"name", "arguments"}]` as `tool_calls.parse_tool_calls`
            gives them) and the answers follow as `{"role": "tool",
            "tool_call_id": ..., "content": str}` messages, or ride on the
            message as `tool_responses` (`[{"name", "response"}]`). They
            are written into the model's turn, and after them the model
            goes on in that turn (no new generation prompt).

    Returns:
        The chat text (str).

    Raises:
        ValueError: bad conversation, malformed tools, tools with a Gemma
            1-3 format; the message names the bad index.

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
    segments = chat_segments(
        messages, chat_format, tools, enable_thinking, add_generation_prompt, allow_system
    )
    return bos_token + "".join(text for text, _ in segments)


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
