"""Gemma 4's tool calling against transformers' rendering of the real template.

The reference is google/gemma-4-31B-it's full chat template, committed
verbatim as `tests/templates/gemma-4-31B-it.jinja`. Its source: the PyPI
source distribution `llama-cpp-python==0.3.36` (`pip download
llama-cpp-python==0.3.36 --no-deps --no-binary :all:`), file
`vendor/llama.cpp/models/templates/google-gemma-4-31B-it.jinja` (sha256
85a08664d16d8f3be4416c92427b3ac10df1024ac566cc0b4bc3bab409393f98). The
same sdist's `google-gemma-4-31B-it-interleaved.jinja` is llama.cpp's own
variant (ggml-org/llama.cpp PR 21418, for interleaved thinking); it reads
no `role: "tool"` messages, so it is not the reference here.

transformers renders it (`tokenizer.apply_chat_template(messages,
tools=tools, chat_template=..., tokenize=False)`) on the tiny Gemma 4
vocabulary of `tokenizer_fixtures`; our `apply_chat_template` must give the
same text, and `parse_tool_calls` must read back the calls it writes.
"""

import copy
import pathlib

import pytest
from conftest import ScriptedSampler
from test_gemma4_chat import CONVERSATIONS, gemma4_text_lm  # noqa: F401 (fixture)
from tokenizer_fixtures import gemma4_tokenizer, hf_gemma4_tokenizer, tiny_tokenizer  # noqa: F401

from keras_gemma import chat_template, tool_calls
from keras_gemma.chat_template import GEMMA4, apply_chat_template
from keras_gemma.generation import prompts as prompts_lib
from keras_gemma.preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.tool_calls import parse_tool_calls

TEMPLATE = (pathlib.Path(__file__).parent / "templates" / "gemma-4-31B-it.jinja").read_text()


def function(name, description, parameters=None, **extra):
    spec = {"name": name, "description": description, **extra}
    if parameters is not None:
        spec["parameters"] = parameters
    return {"type": "function", "function": spec}


WEATHER = function(
    "get_weather",
    "Current weather in a city.",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "City name, e.g. 'Paris, FR'."},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "description": "Days ahead."},
            "threshold": {"type": "number"},
            "alerts": {"type": "boolean", "nullable": True},
            "hours": {"type": "array", "items": {"type": "integer"}, "description": "Hours of the day."},
            "where": {
                "type": "object",
                "description": "A point.",
                "properties": {"lat": {"type": "number"}, "Lon": {"type": "number"}},
                "required": ["lat"],
            },
            "stops": {
                "type": "array",
                "items": {
                    "type": "object",
                    "description": "A stop.",
                    "properties": {"name": {"type": "string"}},
                    "required": ["name"],
                },
            },
        },
        "required": ["city", "unit"],
    },
)
TIME = function("get_time", "The time now.", {"type": "object", "properties": {}})
PING = function("ping", "No parameters.")
SEARCH = function(
    "search",
    "Searches the web.",
    {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    response={"type": "object", "description": "The results."},
)
TOOLS = [WEATHER, TIME, PING, SEARCH]


def call(name, arguments, id=None):
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    return out if id is None else {"id": id, **out}


def system(text):
    return {"role": "system", "content": text}


def user(text):
    return {"role": "user", "content": text}


def assistant(content=None, **fields):
    return {"role": "assistant", "content": content, **fields}


def tool(content, call_id=None, **fields):
    message = {"role": "tool", "content": content, **fields}
    return message if call_id is None else {**message, "tool_call_id": call_id}


PARIS = {"city": "Paris", "unit": "celsius", "days": 3, "threshold": -2.5, "alerts": True,
         "hours": [9, 12], "where": {"lat": 48.85, "Lon": 2.35}, "stops": [{"name": "A, {b}: c"}]}

# Conversations with tool calls. Each ends where a test would stop it.
TOOL_CONVERSATIONS = {
    "declared_with_system": [system("You are a helpful assistant."), user("Weather in Paris?")],
    "declared_no_system": [user("Weather in Paris?")],
    "one_call_pending": [
        user("Weather in Paris?"), assistant(tool_calls=[call("get_weather", {"city": "Paris", "unit": "celsius"})]),
    ],
    "several_calls_tool_messages": [
        system("Be brief."),
        user("Weather and time?"),
        assistant(tool_calls=[call("get_weather", PARIS, id="c1"), call("get_time", {}, id="c2")]),
        tool('{"temperature": 21}', "c1"),
        tool([{"type": "text", "text": "12:00 "}, {"type": "text", "text": "UTC"}], "c2"),
    ],
    "tool_messages_then_answer": [
        user("Weather?"),
        assistant("", tool_calls=[call("get_weather", {"city": "Oslo", "unit": "celsius"})]),
        tool("rain"),
        assistant("  It rains in Oslo. "),
    ],
    "named_tool_messages": [
        user("Weather?"),
        assistant(tool_calls=[call("get_weather", {"city": "Oslo"}, id="a"), call("get_time", {}, id="b")]),
        tool("rain", name="get_weather"),  # no tool_call_id: named by itself
    ],
    "tool_responses_on_message": [
        user("Weather?"),
        assistant(
            tool_calls=[call("get_weather", {"city": "Rome", "unit": "celsius"}), call("ping", {})],
            tool_responses=[
                {"name": "get_weather", "response": {"temperature": 25, "Sky": "clear", "wind": [1.5, None]}},
                {"name": "ping", "response": ["pong", True]},
            ],
        ),
    ],
    "tool_responses_with_answer": [
        user("Ping?"),
        assistant(
            "<|channel>thought\nhm<channel|>Pinged: ok.",
            tool_calls=[call("ping", {})],
            tool_responses=[{"response": 3}],  # no name: "unknown"
        ),
        user("Thanks"),
    ],
    "multi_turn": [
        system("Use tools."),
        user("Weather in Paris?"),
        assistant(tool_calls=[call("get_weather", {"city": "Paris", "unit": "celsius"}, id="1")]),
        tool("sunny, 24", "1"),
        assistant("Sunny, 24 degrees."),
        user("And search for flights."),
        assistant(tool_calls=[call("search", {"query": "flights to Paris"}, id="2")]),
        tool("3 results", "2"),
        assistant("I found 3 flights."),
        user("Thanks!"),
    ],
    "reasoning_before_calls": [
        user("Old question"),
        assistant(tool_calls=[call("ping", {})], reasoning_content="old thought"),  # before the last user: dropped
        tool("pong"),
        assistant("Done."),
        user("Weather?"),
        assistant(tool_calls=[call("get_weather", {"city": "Lima"})], reasoning_content="I should call it."),
        tool("warm"),
    ],
    "string_arguments": [user("Search"), assistant(tool_calls=[call("search", '{"query": "x"}')])],
    "model_role_and_assistant_runs": [
        user("Hi"), assistant("One."), assistant("Two."), {"role": "model", "content": "Three."}, assistant("Four."),
    ],
}


def hf_render(hf_tokenizer, messages, tools, add_generation_prompt, enable_thinking):
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return hf_tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=TEMPLATE, tokenize=False,
        add_generation_prompt=add_generation_prompt, **kwargs,
    )


@pytest.mark.parametrize("enable_thinking", [None, False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(TOOL_CONVERSATIONS))
def test_tool_conversations_match_transformers(hf_gemma4_tokenizer, name, add_generation_prompt, enable_thinking):  # noqa: F811
    messages = TOOL_CONVERSATIONS[name]
    before = copy.deepcopy(messages)
    ours = apply_chat_template(
        messages, tools=TOOLS, chat_format=GEMMA4, add_generation_prompt=add_generation_prompt,
        enable_thinking=bool(enable_thinking),
    )
    assert ours == hf_render(hf_gemma4_tokenizer, messages, TOOLS, add_generation_prompt, enable_thinking)
    assert messages == before


@pytest.mark.parametrize("name", sorted(TOOL_CONVERSATIONS))
def test_tool_conversations_without_declarations(hf_gemma4_tokenizer, name):  # noqa: F811
    messages = TOOL_CONVERSATIONS[name]
    assert apply_chat_template(messages, chat_format=GEMMA4) == hf_render(
        hf_gemma4_tokenizer, messages, None, True, None
    )


@pytest.mark.parametrize("enable_thinking", [None, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_toolless_conversations_match_the_full_template(
    hf_gemma4_tokenizer, name, add_generation_prompt, enable_thinking  # noqa: F811
):
    messages = CONVERSATIONS[name]
    ours = apply_chat_template(
        messages, chat_format=GEMMA4, add_generation_prompt=add_generation_prompt,
        enable_thinking=bool(enable_thinking),
    )
    assert ours == hf_render(hf_gemma4_tokenizer, messages, None, add_generation_prompt, enable_thinking)


@pytest.mark.parametrize("tool_spec", TOOLS, ids=lambda t: t["function"]["name"])
def test_each_declaration_matches_transformers(hf_gemma4_tokenizer, tool_spec):  # noqa: F811
    messages = [user("Hi")]
    expected = hf_render(hf_gemma4_tokenizer, messages, [tool_spec], False, None)
    declaration = "<|tool>" + tool_calls.format_declaration(tool_spec) + "<tool|>"
    assert expected == f"<bos><|turn>system\n{declaration}<turn|>\n<|turn>user\nHi<turn|>\n"


def test_the_full_template_names_gemma4():
    assert chat_template.chat_format_for_template(TEMPLATE) is GEMMA4


def test_reference_text():
    # The syntax spelled out once, as the template writes it.
    text = apply_chat_template(
        [user("Weather?"), assistant(tool_calls=[call("get_weather", {"unit": "celsius", "city": "Paris"})])],
        tools=[function("get_weather", "Weather.", {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})],
        chat_format=GEMMA4,
    )
    assert text == (
        '<bos><|turn>system\n<|tool>declaration:get_weather{description:<|"|>Weather.<|"|>,'
        'parameters:{properties:{city:{type:<|"|>STRING<|"|>}},required:[<|"|>city<|"|>],'
        'type:<|"|>OBJECT<|"|>}}<tool|><turn|>\n'
        "<|turn>user\nWeather?<turn|>\n"
        '<|turn>model\n<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,unit:<|"|>celsius<|"|>}'
        "<tool_call|><|tool_response>"
    )


# -- parse_tool_calls ---------------------------------------------------------------


def _calls_of(messages):
    out = []
    for message in messages:
        for entry in message.get("tool_calls") or []:
            arguments = entry["function"]["arguments"]
            if isinstance(arguments, dict):
                out.append({"name": entry["function"]["name"], "arguments": arguments})
    return out


# String arguments are written as they are: nothing to read back.
@pytest.mark.parametrize("name", sorted(set(TOOL_CONVERSATIONS) - {"string_arguments"}))
def test_parse_reads_back_what_the_template_writes(hf_gemma4_tokenizer, name):  # noqa: F811
    messages = TOOL_CONVERSATIONS[name]
    text = hf_render(hf_gemma4_tokenizer, messages, TOOLS, True, None)
    assert parse_tool_calls(text) == _calls_of(messages)


@pytest.mark.parametrize(
    "arguments",
    [
        {},
        {"s": "text with , : { } [ ] and \n newlines", "empty": "", "uni": "多轮 😀"},
        {"i": 0, "neg": -17, "f": 2.5, "e": 1e-07, "big": 1e20, "t": True, "no": False, "none": None},
        {"nested": {"B": [1, {"x": "y"}], "a": []}, "list": [[1, 2], ["a"], {}]},
    ],
)
def test_values_round_trip(arguments):
    text = tool_calls.format_call("f", arguments) + "<|tool_response>"
    assert parse_tool_calls("thinking first " + text) == [{"name": "f", "arguments": arguments}]


def test_parse_without_calls_and_errors():
    assert parse_tool_calls("Just an answer.") == []
    with pytest.raises(ValueError, match="Tool call 0 is cut short"):
        parse_tool_calls('<|tool_call>call:f{a:<|"|>x')
    with pytest.raises(ValueError, match="Cannot parse the tool call 1: expected a value"):
        parse_tool_calls("<|tool_call>call:f{}<tool_call|><|tool_call>call:g{a:}<tool_call|>")
    with pytest.raises(ValueError, match="expected 'call:'"):
        parse_tool_calls("<|tool_call>f{}<tool_call|>")
    with pytest.raises(ValueError, match="a string is not closed"):
        parse_tool_calls('<|tool_call>call:f{a:<|"|>x}<tool_call|>')


def test_calls_from_parse_go_back_into_a_conversation(hf_gemma4_tokenizer):  # noqa: F811
    reply = tool_calls.format_call("get_weather", {"city": "Paris"}) + "<|tool_response>"
    calls = parse_tool_calls(reply)
    history = [user("Weather?"), assistant(tool_calls=calls), tool("sunny")]
    openai_form = [user("Weather?"), assistant(tool_calls=[call(**c) for c in calls]), tool("sunny")]
    assert apply_chat_template(history, tools=TOOLS, chat_format=GEMMA4) == hf_render(
        hf_gemma4_tokenizer, openai_form, TOOLS, True, None
    )


# -- errors -------------------------------------------------------------------------


def test_gemma_1_to_3_formats_have_no_tools():
    with pytest.raises(ValueError, match="'gemma' chat format .Gemma 1-3. has no tool calling"):
        apply_chat_template([user("Hi")], tools=TOOLS)
    with pytest.raises(ValueError, match="Message 1 has tool_calls: the 'gemma' chat format"):
        apply_chat_template([user("Hi"), assistant(tool_calls=[call("ping", {})])])
    with pytest.raises(ValueError, match="Message 1 has role 'tool': the 'gemma' chat format"):
        apply_chat_template([user("Hi"), tool("x")], chat_format="gemma")
    # An empty list declares nothing, in any format.
    assert apply_chat_template([user("Hi")], tools=[]) == apply_chat_template([user("Hi")])


@pytest.mark.parametrize(
    "tools, pattern",
    [
        (WEATHER, "`tools` must be a list"),
        ([{"name": "f", "parameters": {}}], "Tool 0 must be a dict {'type': 'function', 'function'"),
        ([TIME, function("", "no name")], "Tool 1: 'function' needs a 'name'"),
        ([function("f", "d", ["x"])], r"Tool 0 \(f\): 'parameters' must be a JSON schema dict"),
        ([function("f", "d", {"type": "object", "properties": ["x"]})], "'properties'\\] must map"),
        ([function("f", "d", {"type": "object", "properties": {}, "required": "x"})], "'required'\\] must be a list"),
    ],
)
def test_malformed_tools(tools, pattern):
    with pytest.raises(ValueError, match=pattern):
        apply_chat_template([user("Hi")], tools=tools, chat_format=GEMMA4)


def test_parameters_the_template_hides_warn(hf_gemma4_tokenizer):  # noqa: F811
    # The template reads a parameter named like a schema keyword as one, and
    # leaves it out; we write what it writes, and say so.
    issue = function("create_issue", "d", {"type": "object", "properties": {
        "title": {"type": "string"}, "description": {"type": "string"}}})
    with pytest.warns(UserWarning, match=r"Tool 0 \(create_issue\): .* named description out"):
        text = apply_chat_template([user("Hi")], tools=[issue], chat_format=GEMMA4)
    assert "title:" in text and "description:{" not in text
    assert text == hf_render(hf_gemma4_tokenizer, [user("Hi")], [issue], True, None)


@pytest.mark.parametrize(
    "messages, pattern",
    [
        ([user("a"), assistant("b"), tool("c")], "Message 2: a 'tool' message must follow an assistant"),
        ([user("a"), assistant(tool_calls=[call("ping", {})], tool_responses=[{"response": 1}]), tool("c")],
         "Message 2: a 'tool' message must follow"),
        ([user("a"), assistant(tool_calls=[call("ping", {}), call("get_time", {})]), tool("c")],
         "Message 2: this tool response could answer calls to get_time, ping"),
        ([user("a"), assistant(tool_calls=[call("ping", {}, id="1")]), tool("c", "2")],
         "Message 2: a 'tool' message needs a 'tool_call_id'"),
        ([user("a"), assistant(tool_calls=[{"function": {"arguments": {}}}])], "Message 1: tool call 0 must be"),
        ([user("a"), assistant(tool_calls={"name": "f"})], "Message 1: 'tool_calls' must be a list"),
        ([user("a"), assistant(tool_calls=[call("ping", {})], tool_responses=[{"name": "ping"}])],
         "Message 1: tool response 0 must be {'name': ..., 'response': ...}"),
        ([user("a"), assistant(tool_calls=[call("ping", {})]), tool(None)], "Message 2 has no 'content'"),
    ],
)
def test_bad_tool_conversations(messages, pattern):
    with pytest.raises(ValueError, match=pattern):
        apply_chat_template(messages, tools=TOOLS, chat_format=GEMMA4)


def test_chat_turns_is_text_only():
    with pytest.raises(ValueError, match="`chat_turns` covers conversations without tools"):
        chat_template.chat_turns(TOOL_CONVERSATIONS["one_call_pending"], chat_format=GEMMA4)


# -- tokenizer, preprocessor, generation -------------------------------------------


def test_token_ids_match_transformers(gemma4_tokenizer, hf_gemma4_tokenizer):  # noqa: F811
    for messages in TOOL_CONVERSATIONS.values():
        text = apply_chat_template(messages, tools=TOOLS, chat_format=GEMMA4)
        assert gemma4_tokenizer(text) == hf_gemma4_tokenizer.encode(text, add_special_tokens=False)
    assert gemma4_tokenizer.tool_response_id == gemma4_tokenizer.token_to_id("<|tool_response>")
    assert gemma4_tokenizer.tool_response_id in gemma4_tokenizer.special_token_ids


def test_tiny_tokenizer_has_no_tool_stop(tiny_tokenizer):  # noqa: F811
    assert tiny_tokenizer.tool_response_id is None


def test_training_on_a_tool_conversation(gemma4_tokenizer):  # noqa: F811
    preprocessor = GemmaCausalLMPreprocessor(gemma4_tokenizer, sequence_length=2048, tools=TOOLS)
    messages = TOOL_CONVERSATIONS["multi_turn"] + [assistant("Bye.")]
    x, y, weight = preprocessor(messages)
    length = int(x["padding_mask"].sum())
    rendered = apply_chat_template(messages, tools=TOOLS, chat_format=GEMMA4, add_generation_prompt=False)
    ids = gemma4_tokenizer(rendered)
    assert x["token_ids"][:length].tolist() == ids
    # Trained: the model's calls, the <|tool_response> it stops on, its text
    # and turn ends; not the tools' answers.
    trained = gemma4_tokenizer.detokenize(y[weight > 0].tolist())
    expected = (
        '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,unit:<|"|>celsius<|"|>}<tool_call|><|tool_response>'
        "Sunny, 24 degrees.<turn|>"
        '<|tool_call>call:search{query:<|"|>flights to Paris<|"|>}<tool_call|><|tool_response>'
        "I found 3 flights.<turn|>Bye.<turn|>"
    )
    assert trained == expected


def test_preprocessor_declares_its_tools(gemma4_tokenizer):  # noqa: F811
    preprocessor = GemmaCausalLMPreprocessor(gemma4_tokenizer, sequence_length=2048, tools=TOOLS)
    assert GemmaCausalLMPreprocessor.from_config(preprocessor.get_config()).tools == TOOLS
    messages = TOOL_CONVERSATIONS["several_calls_tool_messages"]
    text = apply_chat_template(messages, tools=TOOLS, chat_format=GEMMA4)
    assert preprocessor.apply_chat_template(messages) == text
    prompt = preprocessor.generate_preprocess(messages)
    assert prompt["token_ids"][: int(prompt["padding_mask"].sum())].tolist() == gemma4_tokenizer(text)
    # Per call, `tools` replaces the layer's.
    other = preprocessor.generate_preprocess(messages, tools=[TIME])
    assert other["token_ids"][: int(other["padding_mask"].sum())].tolist() == gemma4_tokenizer(
        apply_chat_template(messages, tools=[TIME], chat_format=GEMMA4)
    )


# Small enough for the tiny model's 256 positions.
CITY_WEATHER = function(
    "get_weather", "Weather.", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
)


def test_generate_stops_where_the_model_yields_to_the_tool(gemma4_text_lm):  # noqa: F811
    lm = gemma4_text_lm
    tokenizer = lm.preprocessor.tokenizer
    tool_response = tokenizer.tool_response_id
    reply_text = tool_calls.format_call("get_weather", {"city": "Paris"})
    script = tokenizer.tokenize(reply_text) + [tool_response]
    lm.compile(sampler=ScriptedSampler(script + [tokenizer.token_to_id("a")] * 8))
    try:
        messages = [user("Weather?")]
        assert tool_response in prompts_lib.resolve_stop_ids(lm, "auto")
        full = lm.generate(messages, max_new_tokens=40, tools=[CITY_WEATHER])
        prompt = apply_chat_template(messages, tools=[CITY_WEATHER], chat_format=GEMMA4, bos_token="")
        assert full == prompt + reply_text  # stopped on <|tool_response>, dropped from the text
        # A batch of conversations: `chat` runs `generate`'s compiled loop again.
        [reply] = lm.chat([messages], max_new_tokens=40, tools=[CITY_WEATHER])
        assert reply == reply_text
        calls = parse_tool_calls(reply)
        assert calls == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
        # The answer goes back in the model's turn; the model goes on there
        # (no new generation prompt).
        history = messages + [assistant(tool_calls=calls), tool("sunny")]
        text = lm.preprocessor.apply_chat_template(history, tools=[CITY_WEATHER])
        # (The template leaves out the empty thought that primed the reply.)
        assert text.endswith(
            "<|turn>model\n" + reply + '<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>'
        )
    finally:
        lm.compile(sampler="greedy")
