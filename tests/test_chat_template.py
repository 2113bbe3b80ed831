"""apply_chat_template against the Hugging Face Jinja templates of Gemma 2 and 3."""

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from keras_gemma.chat_template import apply_chat_template, chat_turns
from tokenizer_fixtures import (  # noqa: F401 (fixtures)
    gemma3_tokenizer,
    hf_gguf_tokenizer,
)

# google/gemma-2-2b-it tokenizer_config.json "chat_template" (Gemma 1 is the same).
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# google/gemma-3-1b-it tokenizer_config.json "chat_template".
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


def render(template, messages, add_generation_prompt):
    """Renders as transformers does (`utils/chat_template_utils.py`)."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token="<bos>"
    )


def user(text):
    return {"role": "user", "content": text}


def model(text, role="assistant"):
    return {"role": role, "content": text}


CONVERSATIONS = [
    [user("Hi!")],
    [user("  What is 2 + 2?\n"), model("4 ")],
    [user("Hello"), model("Hi, how can I help?", role="model"), user("\tTell me a joke.\n\n")],
    [user("多轮对话 😀"), model("好的。\n\n```python\nprint(1)\n```"), user("谢谢"), model("  不客气  ")],
    [user("<start_of_turn> inside text"), model("")],
    [user(""), model("empty prompt")],
]

SYSTEM_CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, user("Hi!")],
    [{"role": "system", "content": "  Keep spaces. "}, user(" Question? "), model("Answer.")],
    [{"role": "system", "content": [{"type": "text", "text": "Parts."}]},
     {"role": "user", "content": [{"type": "text", "text": " a "}, {"type": "text", "text": "b "}]}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_matches_gemma2_and_gemma3_templates(messages, add_generation_prompt):
    ours = apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ours == render(GEMMA2_TEMPLATE, messages, add_generation_prompt)
    assert ours == render(GEMMA3_TEMPLATE, messages, add_generation_prompt)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", SYSTEM_CONVERSATIONS)
def test_system_matches_gemma3_template(messages, add_generation_prompt):
    ours = apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert ours == render(GEMMA3_TEMPLATE, messages, add_generation_prompt)
    with pytest.raises(jinja2.exceptions.TemplateError):
        render(GEMMA2_TEMPLATE, messages, add_generation_prompt)
    with pytest.raises(ValueError, match="Message 0"):
        apply_chat_template(messages, allow_system=False)


def test_reference_text():
    # The Gemma 3 template's rendering of this conversation, literally.
    text = apply_chat_template(
        [{"role": "system", "content": "Sys."}, user(" Hi "), model("Yo"), user("More")]
    )
    assert text == (
        "<bos><start_of_turn>user\nSys.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nYo<end_of_turn>\n"
        "<start_of_turn>user\nMore<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_bos_token_argument():
    assert apply_chat_template([user("x")], bos_token="").startswith("<start_of_turn>")


@pytest.mark.parametrize(
    "messages, index",
    [
        ([user("a"), user("b")], 1),
        ([model("a")], 0),
        ([user("a"), model("b"), model("c")], 2),
        ([{"role": "system", "content": "s"}, model("a")], 1),
    ],
)
def test_non_alternating_roles_name_the_message(messages, index):
    with pytest.raises(ValueError, match=f"Message {index} .*alternate"):
        apply_chat_template(messages)
    # The Hugging Face templates reject these too.
    with pytest.raises(jinja2.exceptions.TemplateError):
        render(GEMMA3_TEMPLATE, messages, True)


@pytest.mark.parametrize(
    "messages, pattern",
    [
        ([], "empty"),
        ([user("a"), {"role": "robot", "content": "b"}], "Message 1 has unknown role 'robot'"),
        ([user("a"), {"role": "assistant"}], "Message 1 has no 'content'"),
        ([{"role": "user", "content": None}], "Message 0 has no 'content'"),
        ([user("a"), model("b"), {"role": "system", "content": "c"}], "Message 2: a system"),
        ([{"role": "system", "content": "only"}], "needs a user message"),
        (["just a string"], "Message 0 must be a dict"),
        ([user(3)], "Message 0 'content' must be a string"),
        ([{"role": "user", "content": [{"type": "image"}]}], "Message 0: only text"),
        ({"role": "user", "content": "a"}, "must be a list"),
    ],
)
def test_bad_conversations(messages, pattern):
    with pytest.raises(ValueError, match=pattern):
        apply_chat_template(messages)


def test_chat_turns():
    turns = chat_turns([{"role": "system", "content": "S"}, user(" u "), model(" m ")])
    assert turns == [("user", "S\n\nu"), ("model", "m")]


def test_chat_text_tokenizes_like_transformers(gemma3_tokenizer, hf_gguf_tokenizer):
    for messages in CONVERSATIONS + SYSTEM_CONVERSATIONS:
        text = apply_chat_template(messages)
        ids = gemma3_tokenizer(text)
        assert ids == hf_gguf_tokenizer.encode(text, add_special_tokens=False)
        assert ids[:2] == [2, 105]
        assert ids.count(106) == len(chat_turns(messages))
