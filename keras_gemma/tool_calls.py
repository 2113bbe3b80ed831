"""Gemma 4's tool-calling syntax, written in Python.

Gemma 4's chat template (google/gemma-4-31B-it's `chat_template.jinja`; see
`tests/test_gemma4_tools.py`) writes tools, tool calls and tool responses in a
syntax of its own, close to JSON but not JSON:

- strings go between `<|"|>` tokens, unescaped: `<|"|>Paris<|"|>`;
- objects are `{key:value,...}` with keys sorted (case-insensitively) and
  unquoted, except inside declarations, where nested keys are quoted;
- booleans are `true`/`false`; numbers and anything else as Python prints
  them (so `None` is `None`).

A function is declared in the system turn as
`<|tool>declaration:NAME{description:<|"|>...<|"|>,parameters:{...}}<tool|>`;
the model calls it with `<|tool_call>call:NAME{key:value,...}<tool_call|>`,
then writes `<|tool_response>` and stops (it yields to the tool there); the
answer comes back as `<|tool_response>response:NAME{key:value,...}<tool_response|>`
(`response:NAME{value:...}` for an answer that is not a mapping).

`parse_tool_calls` reads the model's calls back into
`[{"name": ..., "arguments": {...}}]`.
"""

import dataclasses
import re
import warnings

QUOTE = '<|"|>'


@dataclasses.dataclass(frozen=True)
class ToolSyntax:
    """The markers one chat format writes tools with.

    Attributes:
        declaration: `(open, close)` around a function declaration.
        call: `(open, close)` around one tool call.
        response: `(open, close)` around one tool response; the model writes
            `response[0]` after its calls and stops there.
        quote: written on both sides of a string value.
    """

    declaration: tuple = ("<|tool>", "<tool|>")
    call: tuple = ("<|tool_call>", "<tool_call|>")
    response: tuple = ("<|tool_response>", "<tool_response|>")
    quote: str = QUOTE


GEMMA4_TOOLS = ToolSyntax()


def _sorted_items(mapping):
    # Jinja's `dictsort`: by key, case-insensitively, ties in dict order.
    return sorted(mapping.items(), key=lambda item: item[0].lower() if isinstance(item[0], str) else item[0])


def format_value(value, escape_keys=True):
    """A Python/JSON value in the template's syntax (its `format_argument`
    macro): strings quoted with `<|"|>`, `true`/`false`, `{key:value}` with
    sorted keys (quoted with `escape_keys`), `[a,b]`.

    Example:

    ```python
    format_value({"city": "Paris", "days": 3}, escape_keys=False)
    # '{city:<|"|>Paris<|"|>,days:3}'
    ```
    """
    if isinstance(value, str):
        return QUOTE + value + QUOTE
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        items = []
        for key, item in _sorted_items(value):
            key = QUOTE + key + QUOTE if escape_keys else str(key)
            items.append(key + ":" + format_value(item, escape_keys))
        return "{" + ",".join(items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(item, escape_keys) for item in value) + "]"
    return str(value)


def _get(value, key):
    """`value[key]` as Jinja reads it: None where `value` is no mapping or
    has no such key."""
    return value.get(key) if isinstance(value, dict) else None


def _upper(value):
    return "" if value is None else str(value).upper()


def _comma(parts):
    return "," if parts else ""


_SCHEMA_KEYS = ("description", "type", "properties", "required", "nullable")


def _format_required(names):
    return "required:[" + ",".join(QUOTE + str(name) + QUOTE for name in names) + "]"


def _format_items(items):
    """An array's `items` schema (its keys sorted; None values left out)."""
    parts = []
    for key, value in _sorted_items(items):
        if value is None:
            continue
        if key == "properties":
            inner = format_parameters(value) if isinstance(value, dict) else ""
            parts.append("properties:{" + inner + "}")
        elif key == "required":
            parts.append(_format_required(value))
        elif key == "type":
            kind = _upper(value) if isinstance(value, str) else [_upper(v) for v in value]
            parts.append("type:" + format_value(kind))
        else:
            parts.append(f"{key}:{format_value(value)}")
    return "items:{" + ",".join(parts) + "}"


def format_parameters(properties):
    """The `properties` of a JSON schema in the template's syntax (its
    `format_parameters` macro): `name:{description:...,type:<|"|>STRING<|"|>}`
    per property, sorted by name. As in the template, a property named like a
    schema keyword (`type`, `description`, `properties`, `required`,
    `nullable`) is left out."""
    out = []
    for key, value in _sorted_items(properties):
        if key in _SCHEMA_KEYS:
            continue
        parts = []
        kind = _upper(_get(value, "type"))
        if _get(value, "description"):
            parts.append(f"description:{QUOTE}{value['description']}{QUOTE}")
        if kind == "STRING":
            if _get(value, "enum"):
                parts.append("enum:" + format_value(value["enum"]))
        elif kind == "ARRAY" and isinstance(_get(value, "items"), dict) and value["items"]:
            parts.append(_format_items(value["items"]))
        if _get(value, "nullable"):
            parts.append("nullable:true")
        if kind == "OBJECT":
            nested = _get(value, "properties")
            # As in the template, an object schema without `properties` is
            # read as its own properties.
            nested = nested if isinstance(nested, dict) else value
            parts.append("properties:{" + format_parameters(nested) + "}")
            if _get(value, "required"):
                parts.append(_format_required(value["required"]))
        parts.append(f"type:{QUOTE}{kind}{QUOTE}")
        out.append(f"{key}:{{{','.join(parts)}}}")
    return ",".join(out)


def check_tools(tools):
    """Raises a clear `ValueError` for tools that are not OpenAI-style
    function declarations; returns them as a list."""
    if tools is None:
        return []
    if isinstance(tools, dict) or not isinstance(tools, (list, tuple)):
        raise ValueError(
            "`tools` must be a list of {'type': 'function', 'function': {'name', "
            f"'description', 'parameters'}}}} dicts, got {type(tools).__name__}."
        )
    for index, tool in enumerate(tools):
        function = _get(tool, "function")
        if not isinstance(function, dict):
            raise ValueError(
                f"Tool {index} must be a dict {{'type': 'function', 'function': {{'name': ..., "
                f"'description': ..., 'parameters': {{...}}}}}} (a JSON schema), got {tool!r:.200}."
            )
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"Tool {index}: 'function' needs a 'name' (a non-empty string), got {name!r}.")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ValueError(
                f"Tool {index} ({name}): 'parameters' must be a JSON schema dict, got {parameters!r:.200}."
            )
        if parameters and not isinstance(parameters.get("properties", {}), dict):
            raise ValueError(
                f"Tool {index} ({name}): 'parameters'['properties'] must map each parameter name to its "
                f"schema, got {parameters['properties']!r:.200}."
            )
        if parameters and not isinstance(parameters.get("required", []), (list, tuple)):
            raise ValueError(
                f"Tool {index} ({name}): 'parameters'['required'] must be a list of parameter names, "
                f"got {parameters['required']!r:.200}."
            )
        hidden = sorted(set((parameters or {}).get("properties") or {}) & set(_SCHEMA_KEYS))
        if hidden:
            warnings.warn(
                f"Tool {index} ({name}): Gemma 4's template leaves parameters named "
                f"{', '.join(hidden)} out of the declaration (it reads those names as schema "
                "keywords), so the model does not see them: rename them.",
                stacklevel=3,
            )
    return list(tools)


def format_declaration(tool):
    """One function declaration, without its `<|tool>`/`<tool|>` markers (the
    template's `format_function_declaration` macro), from an OpenAI-style
    `{"type": "function", "function": {"name", "description", "parameters"}}`.

    Example:

    ```python
    format_declaration({"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city.",
        "parameters": {"type": "object", "required": ["city"],
                       "properties": {"city": {"type": "string"}}}}})
    # 'declaration:get_weather{description:<|"|>Weather in a city.<|"|>,parameters:'
    # '{properties:{city:{type:<|"|>STRING<|"|>}},required:[<|"|>city<|"|>],'
    # 'type:<|"|>OBJECT<|"|>}}'
    ```
    """
    function = tool["function"]
    description = function.get("description", "")  # None is written "None", as in Jinja
    text = f"declaration:{function['name']}{{description:{QUOTE}{description}{QUOTE}"
    parameters = function.get("parameters")
    if parameters:
        text += ",parameters:{"
        if parameters.get("properties"):
            text += "properties:{" + format_parameters(parameters["properties"]) + "},"
        if parameters.get("required"):
            text += _format_required(parameters["required"]) + ","
        if parameters.get("type"):
            text += f"type:{QUOTE}{_upper(parameters['type'])}{QUOTE}}}"
    if "response" in function:
        response = function["response"]
        text += ",response:{"
        if _get(response, "description"):
            text += f"description:{QUOTE}{response['description']}{QUOTE},"
        if _upper(_get(response, "type")) == "OBJECT":
            text += f"type:{QUOTE}OBJECT{QUOTE}}}"
    return (text + "}").strip()


def format_arguments(arguments):
    """A call's arguments as the template writes them inside `call:NAME{...}`:
    a mapping as `key:value` pairs (sorted, keys unquoted); a string as it is."""
    if isinstance(arguments, dict):
        return ",".join(f"{key}:{format_value(value, escape_keys=False)}" for key, value in _sorted_items(arguments))
    if isinstance(arguments, str):
        return arguments
    return ""


def format_call(name, arguments, syntax=GEMMA4_TOOLS):
    """One tool call: `<|tool_call>call:NAME{key:value,...}<tool_call|>`."""
    open_, close = syntax.call
    return f"{open_}call:{name}{{{format_arguments(arguments)}}}{close}"


def format_response(name, response, syntax=GEMMA4_TOOLS):
    """One tool response: `<|tool_response>response:NAME{key:value,...}<tool_response|>`
    for a mapping, `response:NAME{value:...}` for anything else."""
    if isinstance(response, dict):
        body = ",".join(f"{key}:{format_value(value, escape_keys=False)}" for key, value in _sorted_items(response))
    else:
        body = "value:" + format_value(response, escape_keys=False)
    open_, close = syntax.response
    return f"{open_}response:{name}{{{body}}}{close}"


# -- parsing --------------------------------------------------------------------

_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_WORDS = {"true": True, "false": False, "null": None, "None": None, "True": True, "False": False}


class _Reader:
    """A recursive-descent reader of the template's value syntax."""

    def __init__(self, text, where):
        self.text, self.pos, self.where = text, 0, where

    def fail(self, what):
        raise ValueError(
            f"Cannot parse the tool call {self.where}: {what} at character {self.pos} "
            f"of {self.text!r:.300}."
        )

    def skip_space(self):
        while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
            self.pos += 1

    def peek(self, token):
        self.skip_space()
        return self.text.startswith(token, self.pos)

    def expect(self, token):
        if not self.peek(token):
            self.fail(f"expected {token!r}")
        self.pos += len(token)

    def string(self):
        self.expect(QUOTE)
        end = self.text.find(QUOTE, self.pos)
        if end < 0:
            self.fail("a string is not closed")
        value, self.pos = self.text[self.pos:end], end + len(QUOTE)
        return value

    def key(self):
        if self.peek(QUOTE):
            return self.string()
        end = self.text.find(":", self.pos)
        if end < 0:
            self.fail("expected 'key:'")
        key, self.pos = self.text[self.pos:end].strip(), end
        if not key:
            self.fail("an empty key")
        return key

    def pairs(self, close):
        """`key:value,...` up to (not past) `close`."""
        out = {}
        if self.peek(close):
            return out
        while True:
            key = self.key()
            self.expect(":")
            out[key] = self.value()
            if not self.peek(","):
                return out
            self.pos += 1

    def value(self):
        self.skip_space()
        if self.peek(QUOTE):
            return self.string()
        if self.peek("{"):
            self.pos += 1
            value = self.pairs("}")
            self.expect("}")
            return value
        if self.peek("["):
            self.pos += 1
            items = []
            if not self.peek("]"):
                items.append(self.value())
                while self.peek(","):
                    self.pos += 1
                    items.append(self.value())
            self.expect("]")
            return items
        for word, value in _WORDS.items():
            if self.text.startswith(word, self.pos):
                self.pos += len(word)
                return value
        match = _NUMBER.match(self.text, self.pos)
        if match is None:
            self.fail("expected a value")
        self.pos = match.end()
        number = match.group()
        return float(number) if any(c in number for c in ".eE") else int(number)


def parse_call(body, where="0"):
    """`{"name", "arguments"}` of one call's text between the markers:
    `call:NAME{key:value,...}`."""
    reader = _Reader(body, where)
    reader.expect("call:")
    start = reader.pos
    brace = body.find("{", start)
    if brace < 0:
        reader.fail("expected 'call:NAME{'")
    name = body[start:brace].strip()
    if not name:
        reader.fail("the call has no function name")
    reader.pos = brace + 1
    arguments = reader.pairs("}")
    reader.expect("}")
    reader.skip_space()
    if reader.pos != len(body):
        reader.fail("text after the call's closing '}'")
    return {"name": name, "arguments": arguments}


def parse_tool_calls(text, syntax=GEMMA4_TOOLS):
    """The tool calls in a model's reply, as `[{"name": ..., "arguments": {...}}]`.

    Reads every `<|tool_call>call:NAME{...}<tool_call|>` in `text` (what
    `lm.chat(..., tools=...)` returns keeps these markers), in order; text
    around them (thoughts, a trailing `<|tool_response>`) is ignored. Values
    come back as Python values: strings, numbers, booleans, None, lists and
    dicts. An empty list when there is no call.

    Raises:
        ValueError: a call cut short (no `<tool_call|>`), or one that is not
            `call:NAME{key:value,...}`; the message names the call.

    Example:

    ```python
    parse_tool_calls('<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>')
    # [{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]
    ```
    """
    open_, close = syntax.call
    calls = []
    for index, part in enumerate(text.split(open_)[1:]):
        if close not in part:
            raise ValueError(
                f"Tool call {index} is cut short: no {close!r} after {open_}{part[:200]!r} "
                "(raise `max_new_tokens`?)."
            )
        calls.append(parse_call(part.split(close, 1)[0], where=str(index)))
    return calls
