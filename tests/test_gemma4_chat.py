"""Gemma 4's chat format and tokenizer against transformers.

The chat text is checked against transformers' own rendering
(`apply_chat_template(..., tokenize=False)`) of the Gemma 4 template, the
token ids against transformers' GemmaTokenizer on the same SentencePiece
model (a tiny one holding Gemma 4's special tokens), and generation against
Gemma 4's end of turn, `<turn|>`.
"""

import json
import shutil

import keras
import numpy as np
import pytest
from conftest import ScriptedSampler
from test_chat_template import GEMMA3_TEMPLATE
from tokenizer_fixtures import (  # noqa: F401 (fixtures)
    GEMMA4_SPECIAL_TOKENS,
    gemma4_spm_path,
    gemma4_tokenizer,
    hf_gemma4_tokenizer,
    tiny_tokenizer,
)

import keras_gemma
from keras_gemma import chat_template
from keras_gemma.chat_template import GEMMA, GEMMA4, GEMMA4_E, apply_chat_template
from keras_gemma.generation import prompts as prompts_lib
from keras_gemma.preprocessor import GemmaCausalLMPreprocessor
from keras_gemma.tokenizer import GemmaTokenizer

# The text-only, tool-less part of google/gemma-4-31B-it's chat_template.jinja,
# line for line as llama.cpp keeps it (ggml-org/llama.cpp,
# models/templates/google-gemma-4-31B-it-interleaved.jinja at commit
# 3240d8f92c08e9db0be78358b29e06a1f531fe33). Left out: the tool macros and
# the tool declaration, tool call and tool response branches, the last-user
# index they use, and image/audio/video parts. None of them writes anything
# for a conversation of text messages without tools.
GEMMA4_TEMPLATE = """{%- macro strip_thinking(text) -%}
    {%- set ns = namespace(result='') -%}
    {%- for part in text.split('<channel|>') -%}
        {%- if '<|channel>' in part -%}
            {%- set ns.result = ns.result + part.split('<|channel>')[0] -%}
        {%- else -%}
            {%- set ns.result = ns.result + part -%}
        {%- endif -%}
    {%- endfor -%}
    {{- ns.result | trim -}}
{%- endmacro -%}

{%- set ns = namespace(prev_message_type=None, last_user_message=-1) -%}
{%- set loop_messages = messages -%}
{{- bos_token }}
{#- Handle System/Tool Definitions Block -#}
{%- if (enable_thinking is defined and enable_thinking) or tools or messages[0]['role'] in ['system', 'developer'] -%}
    {{- '<|turn>system\\n' -}}

    {#- Inject Thinking token at the very top of the FIRST system turn -#}
    {%- if enable_thinking is defined and enable_thinking -%}
        {{- '<|think|>\\n' -}}
        {%- set ns.prev_message_type = 'think' -%}
    {%- endif -%}

    {%- if messages[0]['role'] in ['system', 'developer'] -%}
        {{- messages[0]['content'] | trim -}}
        {%- set loop_messages = messages[1:] -%}
    {%- endif -%}

    {{- '<turn|>\\n' -}}
{%- endif %}

{#- Loop through messages -#}
{%- for message in loop_messages -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
        {%- if not (ns.prev_message_type == 'tool_response' and message['tool_calls']) -%}
        {{- '<|turn>' + role + '\\n' }}
        {%- endif -%}

        {%- set ns.prev_message_type = None -%}

            {%- if message['content'] is string -%}
                {%- if role == 'model' -%}
                    {{- strip_thinking(message['content']) -}}
                {%- else -%}
                    {{- message['content'] | trim -}}
                {%- endif -%}
            {%- elif message['content'] is sequence -%}
                {%- for item in message['content'] -%}
                    {%- if item['type'] == 'text' -%}
                        {%- if role == 'model' -%}
                            {{- strip_thinking(item['text']) -}}
                        {%- else -%}
                            {{- item['text'] | trim -}}
                        {%- endif -%}
                    {%- endif -%}
                {%- endfor -%}
            {%- endif -%}

        {%- if not (message['tool_responses'] and not message['content']) -%}
            {{- '<turn|>\\n' -}}
        {%- endif -%}
{%- endfor -%}

{%- if add_generation_prompt -%}
    {%- if ns.prev_message_type != 'tool_response' -%}
        {{- '<|turn>model\\n' -}}
    {%- endif -%}
    {%- if not enable_thinking | default(false) -%}
        {{- '<|channel>thought\\n<channel|>' -}}
    {%- endif -%}
{%- endif -%}
"""


# Gemma 4 E2B/E4B: their template has no empty-thought primer on the
# generation prompt. Their own template text was not at hand: this is the
# one above without the primer, which is the only difference known.
GEMMA4_E_TEMPLATE = GEMMA4_TEMPLATE.replace(
    """    {%- if not enable_thinking | default(false) -%}
        {{- '<|channel>thought\\n<channel|>' -}}
    {%- endif -%}
""",
    "",
)
assert GEMMA4_E_TEMPLATE != GEMMA4_TEMPLATE


def system(text):
    return {"role": "system", "content": text}


def user(text):
    return {"role": "user", "content": text}


def model(text, role="assistant"):
    return {"role": role, "content": text}


CONVERSATIONS = {
    "user": [user("Hi!")],
    "system_user": [system("You are terse."), user("Hi!")],
    "system_spaces": [system("  Keep spaces? \n"), user(" Question? "), model(" Answer. ")],
    "developer": [{"role": "developer", "content": "Be exact."}, user("2+2?")],
    "multi_turn": [
        system("You are a helpful assistant."),
        user("Hello"),
        model("Hi, how can I help?", role="model"),
        user("\tTell me a joke.\n\n"),
        model("Why did the chicken cross the road?"),
        user("Why?"),
    ],
    "no_system_multi_turn": [
        user("多轮对话 😀"), model("好的。\n\n```python\nprint(1)\n```"), user("谢谢"), model("  不客气  "),
    ],
    "thoughts_in_history": [
        user("What is 2 + 2?"),
        model("<|channel>thought\nAdd them.<channel|>4"),
        user("And 3 + 3?"),
        model("  <|channel>thought\nx<channel|> 6 <|channel>more<channel|>!  "),
    ],
    "text_parts": [
        user([{"type": "text", "text": " a "}, {"type": "text", "text": "b "}]),
        model([{"type": "text", "text": "<|channel>t<channel|> c "}, {"type": "text", "text": " d"}]),
    ],
    "roles_do_not_alternate": [user("One."), user("Two."), model("Both.")],
    "system_later": [user("Hi"), model("Hello"), system("  Now be formal. "), user("Bye")],
    "system_only": [system("Only a system prompt.")],
    "empty_texts": [user(""), model("")],
    "markers_in_text": [user("<|turn> inside text"), model("<turn|>")],
}


def hf_render(hf_tokenizer, messages, add_generation_prompt, enable_thinking, template=GEMMA4_TEMPLATE):
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return hf_tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )


@pytest.mark.parametrize("enable_thinking", [None, False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_matches_transformers_rendering(
    hf_gemma4_tokenizer, name, add_generation_prompt, enable_thinking  # noqa: F811
):
    messages = CONVERSATIONS[name]
    ours = apply_chat_template(
        messages,
        add_generation_prompt=add_generation_prompt,
        chat_format="gemma4",
        enable_thinking=bool(enable_thinking),
    )
    assert ours == hf_render(hf_gemma4_tokenizer, messages, add_generation_prompt, enable_thinking)


@pytest.mark.parametrize("enable_thinking", [None, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", ["user", "system_user", "multi_turn", "thoughts_in_history"])
def test_e_models_have_no_empty_thought(hf_gemma4_tokenizer, name, add_generation_prompt, enable_thinking):  # noqa: F811
    messages = CONVERSATIONS[name]
    ours = apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, chat_format="gemma4_e",
        enable_thinking=bool(enable_thinking),
    )
    expected = hf_render(
        hf_gemma4_tokenizer, messages, add_generation_prompt, enable_thinking, GEMMA4_E_TEMPLATE
    )
    assert ours == expected
    if add_generation_prompt:
        assert ours.endswith("<|turn>model\n")


def test_format_from_template_text():
    assert chat_template.chat_format_for_template(GEMMA4_TEMPLATE) is GEMMA4
    assert chat_template.chat_format_for_template(GEMMA4_E_TEMPLATE) is GEMMA4_E
    assert chat_template.chat_format_for_template(GEMMA3_TEMPLATE) is GEMMA
    assert chat_template.chat_format_for_template("{{ messages }}") is None


def test_reference_text():
    text = apply_chat_template(
        [system(" Sys. "), user(" Hi "), model("<|channel>thought\nhm<channel|>Yo"), user("More")],
        chat_format=GEMMA4,
    )
    assert text == (
        "<bos><|turn>system\nSys.<turn|>\n"
        "<|turn>user\nHi<turn|>\n"
        "<|turn>model\nYo<turn|>\n"
        "<|turn>user\nMore<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>"
    )
    thinking = apply_chat_template([user("Hi")], chat_format=GEMMA4, enable_thinking=True)
    assert thinking == "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"


@pytest.mark.parametrize(
    "messages, pattern",
    [
        ([], "empty"),
        ([user("a"), {"role": "robot", "content": "b"}], "Message 1 has unknown role 'robot'"),
        ([user("a"), {"role": "tool", "content": "b"}],
         "Message 1: a 'tool' message must follow an assistant message with 'tool_calls'"),
        ([user("a"), {"role": "assistant"}], "Message 1 has no 'content'"),
        ([{"role": "system", "content": [{"type": "text", "text": "s"}]}, user("a")],
         "Message 0: the first system message's content must be a string"),
        ([{"role": "user", "content": [{"type": "image"}]}], "Message 0: only text"),
    ],
)
def test_bad_conversations(messages, pattern):
    with pytest.raises(ValueError, match=pattern):
        apply_chat_template(messages, chat_format=GEMMA4)


def test_thinking_needs_a_format_that_has_it():
    with pytest.raises(ValueError, match="no thinking mode"):
        apply_chat_template([user("Hi")], enable_thinking=True)
    with pytest.raises(ValueError, match="Unknown chat format 'gemma5'"):
        apply_chat_template([user("Hi")], chat_format="gemma5")


# -- tokenizer ---------------------------------------------------------------------


def test_tokenizer_carries_the_gemma4_format(gemma4_tokenizer, tiny_tokenizer):  # noqa: F811
    assert gemma4_tokenizer.chat_format is GEMMA4
    assert gemma4_tokenizer.start_of_turn_id == gemma4_tokenizer.token_to_id("<|turn>")
    assert gemma4_tokenizer.end_of_turn_id == gemma4_tokenizer.token_to_id("<turn|>")
    assert gemma4_tokenizer.end_of_turn_id in gemma4_tokenizer.special_token_ids
    # A Gemma 1-3 vocabulary keeps Gemma 1-3's format.
    assert tiny_tokenizer.chat_format is GEMMA
    assert tiny_tokenizer.end_of_turn_id == tiny_tokenizer.token_to_id("<end_of_turn>")


def test_explicit_chat_format(gemma4_spm_path):  # noqa: F811
    tokenizer = GemmaTokenizer(str(gemma4_spm_path), chat_format="gemma")
    assert tokenizer.chat_format is GEMMA and tokenizer.end_of_turn_id is None
    config = tokenizer.get_config()
    assert config["chat_format"] == "gemma"
    assert GemmaTokenizer(str(gemma4_spm_path)).get_config()["chat_format"] is None
    # keras-hub's Gemma4Tokenizer config keys are accepted (and ignored).
    GemmaTokenizer(str(gemma4_spm_path), has_vision_tokens=True, has_audio_tokens=False,
                   has_video_tokens=True)


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"chat_template.jinja": GEMMA4_TEMPLATE}, GEMMA4),
        ({"chat_template.jinja": GEMMA4_E_TEMPLATE}, GEMMA4_E),
        ({"tokenizer_config.json": json.dumps({"chat_template": GEMMA4_E_TEMPLATE})}, GEMMA4_E),
        ({"tokenizer_config.json": json.dumps({"bos_token": "<bos>"})}, GEMMA4),  # from the vocabulary
        ({}, GEMMA4),
    ],
)
def test_hugging_face_checkpoint_names_its_format(tmp_path, gemma4_spm_path, files, expected):  # noqa: F811
    shutil.copy(gemma4_spm_path, tmp_path / "tokenizer.model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma4_text"}))
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    tokenizer = GemmaTokenizer.from_preset(str(tmp_path))
    assert tokenizer.chat_format is expected
    assert tokenizer.end_of_turn_id == tokenizer.token_to_id("<turn|>")


def test_special_tokens_are_single_ids(gemma4_tokenizer, hf_gemma4_tokenizer):  # noqa: F811
    for token in GEMMA4_SPECIAL_TOKENS:
        ids = gemma4_tokenizer(token)
        assert ids == [gemma4_tokenizer.token_to_id(token)]
        assert ids == hf_gemma4_tokenizer.encode(token, add_special_tokens=False)
        assert gemma4_tokenizer.detokenize(ids) == token
        assert gemma4_tokenizer.detokenize(ids, skip_special_tokens=True) == ""
    text = "a<|channel>thought\nb<channel|>c<|\"|>d<|turn>"
    assert gemma4_tokenizer(text) == hf_gemma4_tokenizer.encode(text, add_special_tokens=False)
    assert gemma4_tokenizer.detokenize(gemma4_tokenizer(text)) == text


@pytest.mark.parametrize("enable_thinking", [False, True])
def test_chat_ids_match_transformers(gemma4_tokenizer, hf_gemma4_tokenizer, enable_thinking):  # noqa: F811
    turn = gemma4_tokenizer.start_of_turn_id
    for messages in CONVERSATIONS.values():
        text = apply_chat_template(messages, chat_format=GEMMA4, enable_thinking=enable_thinking)
        ids = gemma4_tokenizer(text)
        assert ids == hf_gemma4_tokenizer.encode(text, add_special_tokens=False)
        assert ids[0] == gemma4_tokenizer.bos_token_id
        # Every turn opens with one <|turn> id (markers written as message
        # text count too, as in transformers).
        assert ids.count(turn) == text.count("<|turn>")
        think = gemma4_tokenizer.token_to_id("<|think|>")
        assert (think in ids) == enable_thinking


# -- preprocessor ------------------------------------------------------------------


def test_preprocessor_uses_the_tokenizer_format(gemma4_tokenizer):  # noqa: F811
    preprocessor = GemmaCausalLMPreprocessor(gemma4_tokenizer, sequence_length=256)
    messages = CONVERSATIONS["multi_turn"]
    assert preprocessor.apply_chat_template(messages) == apply_chat_template(messages, chat_format=GEMMA4)
    assert preprocessor.apply_chat_template(messages, enable_thinking=True) == apply_chat_template(
        messages, chat_format=GEMMA4, enable_thinking=True
    )
    prompt = preprocessor.generate_preprocess(messages)
    length = int(prompt["padding_mask"].sum())
    expected = gemma4_tokenizer(apply_chat_template(messages, chat_format=GEMMA4))
    assert prompt["token_ids"][:length].tolist() == expected


def test_training_on_a_gemma4_conversation(gemma4_tokenizer):  # noqa: F811
    preprocessor = GemmaCausalLMPreprocessor(gemma4_tokenizer, sequence_length=256)
    messages = CONVERSATIONS["multi_turn"] + [model("<|channel>thought\nhm<channel|>Bye.")]
    x, y, weight = preprocessor(messages)
    length = int(x["padding_mask"].sum())
    # The ids are those of the whole rendered chat (no generation prompt).
    rendered = apply_chat_template(messages, add_generation_prompt=False, chat_format=GEMMA4)
    ids = gemma4_tokenizer(rendered)
    assert x["token_ids"][:length].tolist() == ids[:length]
    # Trained: each model turn's text and its <turn|>, nothing else.
    trained = y[weight > 0].tolist()
    expected = []
    for role, text in chat_template.chat_turns(messages, chat_format=GEMMA4):
        if role == "model":
            expected += gemma4_tokenizer(text + "<turn|>")
    assert trained == expected
    assert trained.count(gemma4_tokenizer.end_of_turn_id) == 3


# -- generation --------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma4_text_lm(gemma4_tokenizer):  # noqa: F811
    keras.utils.set_random_seed(3)
    backbone = keras_gemma.GemmaBackbone(
        vocabulary_size=gemma4_tokenizer.vocabulary_size(), num_layers=2, hidden_dim=32,
        num_query_heads=2, num_key_value_heads=1, head_dim=16, intermediate_dim=64,
        layer_types=("local", "global"), sliding_window_size=4, max_sequence_length=256,
    )
    return keras_gemma.GemmaCausalLM(
        backbone, GemmaCausalLMPreprocessor(gemma4_tokenizer, sequence_length=96)
    )


def test_generation_stops_at_turn_end(gemma4_text_lm):
    lm = gemma4_text_lm
    tokenizer = lm.preprocessor.tokenizer
    end = tokenizer.token_to_id("<turn|>")
    old_end = tokenizer.token_to_id("<end_of_turn>")  # not in Gemma 4's vocabulary: <unk>
    assert old_end == tokenizer.unk_token_id
    tool_response = tokenizer.token_to_id("<|tool_response>")  # where the model yields to a tool
    assert tokenizer.tool_response_id == tool_response
    assert prompts_lib.resolve_stop_ids(lm, "auto") == tuple(sorted((tokenizer.eos_token_id, end, tool_response)))
    words = tokenizer.tokenize("Hi there")
    lm.compile(sampler=ScriptedSampler([*words, end] + [words[0]] * 20))
    try:
        messages = [system("Be brief."), user("Hello world")]
        # The prompt is Gemma 4's chat text, generation prompt and empty thought included.
        full = lm.generate(messages, max_new_tokens=16)
        assert full.startswith(
            "<|turn>system\nBe brief.<turn|>\n<|turn>user\nHello world<turn|>\n"
            "<|turn>model\n<|channel>thought\n<channel|>"
        )
        ids = np.concatenate(list(lm.stream_token_ids(messages, max_new_tokens=16)))
        assert ids.tolist() == [*words, end]  # stopped at <turn|>
        assert lm.chat(messages, max_new_tokens=16) == tokenizer.detokenize(words)
        assert lm.generate(messages, max_new_tokens=16, strip_prompt=True) == tokenizer.detokenize(words)
        # A chat reply also ends where the model opens a new turn.
        lm.compile(sampler=ScriptedSampler([words[0], tokenizer.start_of_turn_id] + [words[1]] * 20))
        assert lm.chat(messages, max_new_tokens=16) == tokenizer.detokenize(words[:1])
    finally:
        lm.compile(sampler="greedy")


def test_chat_with_thinking(gemma4_text_lm):
    lm = gemma4_text_lm
    tokenizer = lm.preprocessor.tokenizer
    channel, channel_end = tokenizer.token_to_id("<|channel>"), tokenizer.token_to_id("<channel|>")
    thought, words = tokenizer.tokenize("thought\nHi"), tokenizer.tokenize("there")
    end = tokenizer.end_of_turn_id
    lm.compile(sampler=ScriptedSampler([channel, *thought, channel_end, *words, end] + [words[0]] * 20))
    lm.preprocessor.enable_thinking = True
    try:
        messages = [user("Hello world")]
        full = lm.generate(messages, max_new_tokens=24)
        assert full.startswith(
            "<|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHello world<turn|>\n<|turn>model\n<|channel>"
        )
        reply = lm.chat(messages, max_new_tokens=24)
        # The thought markers stay in the reply (other control tokens do not).
        assert reply == "<|channel>thought\nHi<channel|>there"
        assert "".join(lm.chat(messages, max_new_tokens=24, stream=True)) == reply
        assert chat_template.split_thinking(reply) == ("Hi", "there")
        # Given back, the reply's thoughts are left out, as the template does.
        history = messages + [model(reply), user("Again")]
        assert "<|turn>model\nthere<turn|>\n" in lm.preprocessor.apply_chat_template(history)
    finally:
        lm.preprocessor.enable_thinking = False
        lm.compile(sampler="greedy")


def test_preprocessor_thinking_setting(gemma4_tokenizer, tiny_tokenizer):  # noqa: F811
    preprocessor = GemmaCausalLMPreprocessor(gemma4_tokenizer, sequence_length=64, enable_thinking=True)
    assert preprocessor.get_config()["enable_thinking"] is True
    assert GemmaCausalLMPreprocessor.from_config(preprocessor.get_config()).enable_thinking is True
    messages = [user("Hi")]
    text = apply_chat_template(messages, chat_format=GEMMA4, enable_thinking=True)
    assert preprocessor.apply_chat_template(messages) == text
    prompt = preprocessor.generate_preprocess(messages)
    assert prompt["token_ids"][: int(prompt["padding_mask"].sum())].tolist() == gemma4_tokenizer(text)
    x, _, _ = preprocessor(messages + [model("Yo")])
    assert gemma4_tokenizer.token_to_id("<|think|>") in x["token_ids"].tolist()
    # Gemma 1-3's format has none.
    with pytest.raises(ValueError, match="no thinking mode"):
        GemmaCausalLMPreprocessor(tiny_tokenizer, enable_thinking=True).apply_chat_template(messages)


def test_split_thinking():
    split = chat_template.split_thinking
    assert split("<|channel>thought\nAdd them.<channel|>4") == ("Add them.", "4")
    assert split(" plain answer ") == ("", "plain answer")
    assert split("<|channel>thought\ncut short") == ("cut short", "")
    assert split(" a <|channel>thought\nx<channel|> b <|channel>y<channel|>!") == ("x\ny", "a  b !")
    assert split("<|channel>x<channel|>y", chat_format=GEMMA) == ("", "<|channel>x<channel|>y")


class _GGUFMetadata:
    """Stands in for an open GGUF file: its tokenizer metadata."""

    def __init__(self, spm_path, template):
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2 as model_pb2

        model = model_pb2.ModelProto()
        with open(spm_path, "rb") as f:
            model.ParseFromString(f.read())
        processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
        self.metadata = {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [piece.piece for piece in model.pieces],
            "tokenizer.ggml.scores": np.array([piece.score for piece in model.pieces], np.float32),
            "tokenizer.ggml.token_type": np.array([piece.type for piece in model.pieces], np.int32),
            "tokenizer.ggml.bos_token_id": processor.bos_id(),
            "tokenizer.ggml.eos_token_id": processor.eos_id(),
            "tokenizer.ggml.unknown_token_id": processor.unk_id(),
            "tokenizer.ggml.padding_token_id": processor.pad_id(),
        }
        if template is not None:
            self.metadata["tokenizer.chat_template"] = template


@pytest.mark.parametrize(
    "template, expected", [(GEMMA4_TEMPLATE, GEMMA4), (GEMMA4_E_TEMPLATE, GEMMA4_E), (None, GEMMA4)]
)
def test_gguf_chat_template_names_the_format(gemma4_spm_path, gemma4_tokenizer, template, expected):  # noqa: F811
    tokenizer = GemmaTokenizer.from_gguf(_GGUFMetadata(gemma4_spm_path, template))
    assert tokenizer.chat_format is expected
    text = apply_chat_template(CONVERSATIONS["multi_turn"], chat_format=expected)
    assert tokenizer(text) == gemma4_tokenizer(text)
