"""Turns text, prompt/response pairs and conversations into training batches.

Pure Python and NumPy, run on the host: the same code serves JAX, TensorFlow
and PyTorch, and TensorFlow is imported only to map over a `tf.data.Dataset`
that the caller already made.
"""

import warnings

import keras
import numpy as np

from keras_gemma import chat_template
from keras_gemma.checkpoints import preset
from keras_gemma.tokenizer import GemmaTokenizer, _as_text, _is_batch


class DroppedSampleWarning(UserWarning):
    """A sample lost all its trained tokens to truncation and was dropped."""


@keras.saving.register_keras_serializable(package="keras_gemma")
class GemmaCausalLMPreprocessor(keras.layers.Layer):
    """Packs text into `(x, y, sample_weight)` for causal language modelling.

    Accepts, for training (`preprocessor(inputs)`):

    - a string or a list of strings: `<bos> text <eos>`, loss on every token;
    - `{"prompts": [...], "responses": [...]}`: `<bos> prompt response <eos>`,
      loss on the response and its `<eos>` only;
    - a conversation (list of `{"role", "content"}` dicts) or a list of them:
      rendered with the tokenizer's chat format (no generation prompt, no
      `<eos>`), loss on the text of each model turn and its end-of-turn marker
      (`<end_of_turn>`, Gemma 4's `<turn|>`) only.

    Output: `x = {"token_ids": int32 (B, L), "padding_mask": bool (B, L)}`,
    `y` int32 (B, L) holding the next token id of each position, and
    `sample_weight` float32 (B, L), 1 where `y` is a trained token. A single
    string or conversation gives unbatched `(L,)` arrays.

    Truncation keeps the start: each sample is cut to `sequence_length + 1`
    tokens (so an `<eos>` that does not fit is lost). A prompt/response pair or
    conversation left with no trained token is dropped from the batch, with a
    warning naming its index; `dropped_samples` holds the indices dropped by
    the last call and `num_dropped_samples` the running count. A batch with
    nothing left raises `ValueError`.

    With `packing=True`, samples are not padded one per row but placed whole,
    in order, into as few rows of `sequence_length` as fit them (each row
    takes the next sample while it has room), and `x` gains `segment_ids`
    int32 (B, L): 1, 2, ... for the samples of a row, 0 for padding. The
    model then keeps each sample to itself (attention within its segment,
    positions restarting at 0), so a packed batch gives the loss of the same
    samples unpacked with less padding. Samples are never cut when packing:
    one longer than `sequence_length + 1` tokens raises `ValueError`.

    Args:
        tokenizer: a `GemmaTokenizer`.
        sequence_length: the padded length `L` of model inputs.
        add_start_token: prepend `<bos>` (Gemma needs it: leave it on).
        add_end_token: append `<eos>` to plain text and to responses.
        packing: pack several samples into each row (see above).
        enable_thinking: render conversations with Gemma 4's thinking on
            (`<|think|>` in the system turn, no empty thought after the
            generation prompt); also read by `lm.chat` and `lm.generate`.
            Gemma 1-3's format has no thinking mode.
        tools: Gemma 4: functions declared in every conversation's system
            turn (OpenAI-style dicts, see
            `chat_template.apply_chat_template`); also read by `lm.chat`
            and `lm.generate` when they are not given `tools`. A
            conversation's assistant messages may carry `tool_calls`, and
            `tool` messages the answers; trained are the model's text, tool
            calls, and the `<|tool_response>` it stops on, not the answers.

    Example:

    ```python
    preprocessor = GemmaCausalLMPreprocessor(tokenizer, sequence_length=128)
    x, y, sample_weight = preprocessor(["The quick brown fox."])
    packer = GemmaCausalLMPreprocessor(tokenizer, sequence_length=128, packing=True)
    x, y, sample_weight = packer(["One.", "Two.", "Three."])  # one row, segments 1-3
    x, y, sample_weight = preprocessor(
        {"prompts": ["2 + 2 ="], "responses": [" 4"]}
    )
    x, y, sample_weight = preprocessor([
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
    ])
    prompt = preprocessor.generate_preprocess(["The quick"], sequence_length=32)
    ```
    """

    tokenizer_cls = GemmaTokenizer  # the class `from_preset` builds (keras-hub's name)

    def __init__(
        self,
        tokenizer,
        sequence_length=512,
        add_start_token=True,
        add_end_token=True,
        packing=False,
        enable_thinking=False,
        tools=None,
        **kwargs,
    ):
        kwargs.pop("config_file", None)  # in keras-hub's preprocessor.json
        super().__init__(**kwargs)
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True
        self.built = True
        self.tokenizer = tokenizer
        self.sequence_length = sequence_length
        self.add_start_token = add_start_token
        self.add_end_token = add_end_token
        self.packing = packing
        self.enable_thinking = enable_thinking
        self.tools = tools
        self.dropped_samples = []
        self.num_dropped_samples = 0

    # -- chat -----------------------------------------------------------------

    @property
    def chat_format(self):
        """The tokenizer's chat format (`chat_template.GEMMA` or `GEMMA4`)."""
        return getattr(self.tokenizer, "chat_format", chat_template.GEMMA)

    def apply_chat_template(self, messages, add_generation_prompt=True, **kwargs):
        """Chat text of a conversation in the tokenizer's chat format (see
        `chat_template.apply_chat_template`; `enable_thinking=True` for Gemma
        4's thinking, `tools=` to declare functions; both default to this
        layer's)."""
        kwargs.setdefault("chat_format", self.chat_format)
        kwargs.setdefault("enable_thinking", self.enable_thinking)
        kwargs.setdefault("tools", self.tools)
        return chat_template.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, **kwargs
        )

    # -- training -------------------------------------------------------------

    def call(self, x, y=None, sample_weight=None, sequence_length=None):
        if sample_weight is not None:
            raise ValueError(
                "GemmaCausalLMPreprocessor makes its own `sample_weight`; "
                "do not pass one."
            )
        sequence_length = sequence_length or self.sequence_length
        samples, batched = self._training_segments(x, y)
        if self.packing:
            self.dropped_samples = []
            token_ids, padding_mask, segment_ids, labels, weights = _pack_rows(
                samples, sequence_length, self.tokenizer.pad_token_id
            )
            x = {"token_ids": token_ids, "padding_mask": padding_mask, "segment_ids": segment_ids}
            return keras.utils.pack_x_y_sample_weight(x, labels, weights)
        token_ids, padding_mask, labels, weights = _pack(
            samples, sequence_length, self.tokenizer.pad_token_id
        )
        kept = np.flatnonzero(weights.sum(axis=1) > 0)
        self.dropped_samples = [
            int(i) for i in np.setdiff1d(np.arange(len(samples)), kept)
        ]
        if self.dropped_samples:
            self.num_dropped_samples += len(self.dropped_samples)
            if kept.size == 0:
                raise ValueError(
                    f"No sample has a trained token left within "
                    f"sequence_length={sequence_length} (samples "
                    f"{self.dropped_samples}). Raise `sequence_length` or "
                    "shorten the prompts."
                )
            warnings.warn(
                f"Dropped {len(self.dropped_samples)} sample(s) with no response "
                f"token left within sequence_length={sequence_length} (the "
                f"prompt fills it): indices {self.dropped_samples}.",
                DroppedSampleWarning,
                stacklevel=2,
            )
            token_ids, padding_mask = token_ids[kept], padding_mask[kept]
            labels, weights = labels[kept], weights[kept]
        x = {"token_ids": token_ids, "padding_mask": padding_mask}
        if not batched:
            x = {key: value[0] for key, value in x.items()}
            labels, weights = labels[0], weights[0]
        return keras.utils.pack_x_y_sample_weight(x, labels, weights)

    def _training_segments(self, x, y):
        """Per sample, a list of `(token_ids, trained)` segments."""
        kind, batched, data = _classify(x, y)
        bos = [self.tokenizer.bos_token_id] if self.add_start_token else []
        eos = [self.tokenizer.eos_token_id] if self.add_end_token else []
        if kind == "text":
            return [
                [(bos, False), (ids + eos, True)]
                for ids in self.tokenizer.tokenize(data)
            ], batched
        if kind == "pairs":
            prompts, responses = data
            prompt_ids = self.tokenizer.tokenize(prompts)
            response_ids = self.tokenizer.tokenize(responses)
            return [
                [(bos + p, False), (r + eos, True)]
                for p, r in zip(prompt_ids, response_ids)
            ], batched
        return [self._conversation_segments(c, bos, i) for i, c in enumerate(data)], batched

    def _conversation_segments(self, conversation, bos, index):
        try:
            segments = chat_template.chat_segments(
                conversation, chat_format=self.chat_format, tools=self.tools,
                enable_thinking=self.enable_thinking,
            )
        except ValueError as error:
            raise ValueError(f"Conversation {index}: {error}") from None
        # Text between trained parts, and the trained parts themselves. Cuts
        # fall next to control tokens or Gemma's atomic "\n" piece, so the
        # ids equal those of the whole rendered text (tested).
        texts = [text for text, _ in segments]
        trained = [is_trained for _, is_trained in segments]
        ids = self.tokenizer.tokenize(texts)
        return [(bos, False)] + list(zip(ids, trained))

    # -- generation -----------------------------------------------------------

    def generate_preprocess(self, x, sequence_length=None, tools=None):
        """Token ids and padding mask of prompts, for generation.

        `<bos>` + prompt, no `<eos>`; a conversation is rendered in the
        tokenizer's chat format with its generation prompt
        (`<start_of_turn>model\\n`; Gemma 4 adds an empty thought). A dict
        may give `{"prompts": [...]}`. Ids are padded on the right to
        `sequence_length` (default: the layer's); a longer prompt raises
        `ValueError` rather than being cut. `tools` (Gemma 4; default: the
        layer's) are declared in each conversation.

        Returns:
            `{"token_ids": int32 (B, L), "padding_mask": bool (B, L)}`, or
            `(L,)` arrays for a single prompt.
        """
        sequence_length = sequence_length or self.sequence_length
        if isinstance(x, dict):
            if "prompts" not in x:
                raise ValueError("generate_preprocess takes a dict with 'prompts'.")
            x = x["prompts"]
        kind, batched, data = _classify(x, None)
        bos = "<bos>" if self.add_start_token else ""
        if kind == "conversations":
            texts = []
            for index, conversation in enumerate(data):
                try:
                    texts.append(
                        chat_template.apply_chat_template(
                            conversation, bos_token=bos, chat_format=self.chat_format,
                            enable_thinking=self.enable_thinking,
                            tools=self.tools if tools is None else tools,
                        )
                    )
                except ValueError as error:
                    raise ValueError(f"Conversation {index}: {error}") from None
            sequences = self.tokenizer.tokenize(texts)
        else:
            start = [self.tokenizer.bos_token_id] if self.add_start_token else []
            sequences = [start + ids for ids in self.tokenizer.tokenize(data)]
        for index, ids in enumerate(sequences):
            if len(ids) > sequence_length:
                raise ValueError(
                    f"Prompt {index} has {len(ids)} tokens, more than "
                    f"sequence_length={sequence_length}."
                )
        samples = [[(ids, False)] for ids in sequences]
        token_ids, padding_mask, _, _ = _pack(
            samples, sequence_length, self.tokenizer.pad_token_id, shift=False
        )
        if not batched:
            return {"token_ids": token_ids[0], "padding_mask": padding_mask[0]}
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    def generate_postprocess(self, x):
        """Text of generated token ids, without pad/bos/eos/end_of_turn.

        Args:
            x: `{"token_ids", "padding_mask"}` (positions outside the mask are
                dropped too) or a token id array, `(B, L)` or `(L,)`.

        Returns:
            A list of strings, or one string for a `(L,)` input.
        """
        if isinstance(x, dict):
            token_ids = keras.ops.convert_to_numpy(x["token_ids"])
            mask = x.get("padding_mask")
            mask = None if mask is None else keras.ops.convert_to_numpy(mask)
        else:
            token_ids, mask = keras.ops.convert_to_numpy(x), None
        batched = token_ids.ndim == 2
        token_ids = np.atleast_2d(token_ids)
        keep = ~np.isin(token_ids, self.tokenizer.special_token_ids)
        if mask is not None:
            keep &= np.atleast_2d(mask).astype(bool)
        texts = self.tokenizer.detokenize(
            [row[row_keep].tolist() for row, row_keep in zip(token_ids, keep)]
        )
        return texts if batched else texts[0]

    # -- config ---------------------------------------------------------------

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "tokenizer": keras.saving.serialize_keras_object(self.tokenizer),
                "sequence_length": self.sequence_length,
                "add_start_token": self.add_start_token,
                "add_end_token": self.add_end_token,
                "packing": self.packing,
                "enable_thinking": self.enable_thinking,
                "tools": self.tools,
            }
        )
        return config

    @classmethod
    def from_preset(cls, handle, dtype=None, load_weights=True, **kwargs):
        """The preprocessor of a preset (name, `kaggle://`, `hf://`, directory or
        `.gguf`); `sequence_length` comes from its preprocessor.json unless given."""
        return preset.load_preprocessor(handle, cls, **kwargs)

    def save_to_preset(self, directory):
        """Writes preprocessor.json, tokenizer.json and the vocabulary (keras-hub layout)."""
        preset.save_preprocessor(self, directory)

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("tokenizer"), dict):
            config["tokenizer"] = keras.saving.deserialize_keras_object(
                config["tokenizer"]
            )
        return cls(**config)



def _classify(x, y):
    """`(kind, batched, data)` for the accepted input forms.

    kind is "text" (data: list of str), "pairs" (data: (prompts, responses))
    or "conversations" (data: list of conversations).
    """
    if y is not None:
        return _pairs(x, y)
    if isinstance(x, dict):
        missing = {"prompts", "responses"} - set(x)
        if missing:
            raise ValueError(
                "A dict input needs 'prompts' and 'responses'; missing "
                f"{sorted(missing)}."
            )
        return _pairs(x["prompts"], x["responses"])
    if chat_template.is_conversation(x):
        return "conversations", False, [x]
    if chat_template.is_conversation_batch(x):
        return "conversations", True, list(x)
    if not _is_batch(x):
        return "text", False, [_as_text(x)]
    texts = [_as_text(item) for item in _flatten_strings(x)]
    if not texts:
        raise ValueError("Got an empty batch.")
    return "text", True, texts


def _pairs(prompts, responses):
    batched = _is_batch(prompts)
    if batched != _is_batch(responses):
        raise ValueError("'prompts' and 'responses' must both be strings or both lists.")
    if not batched:
        return "pairs", False, ([_as_text(prompts)], [_as_text(responses)])
    prompts = [_as_text(p) for p in _flatten_strings(prompts)]
    responses = [_as_text(r) for r in _flatten_strings(responses)]
    if len(prompts) != len(responses):
        raise ValueError(
            f"Got {len(prompts)} prompts but {len(responses)} responses."
        )
    if not prompts:
        raise ValueError("Got an empty batch.")
    return "pairs", True, (prompts, responses)


def _flatten_strings(x):
    """A (B,) or (B, 1) numpy array or list of strings as a flat list."""
    if isinstance(x, np.ndarray):
        return x.reshape(-1).tolist()
    return list(x)


def _pack(samples, sequence_length, pad_id, shift=True):
    """Concatenates each sample's segments, cuts the end, pads on the right.

    With `shift`, each sample is cut to `sequence_length + 1` tokens: inputs
    are tokens `[0, L)` and labels tokens `[1, L + 1)`, weighted by whether
    the label token is trained.
    """
    batch = len(samples)
    width = sequence_length + 1 if shift else sequence_length
    ids = np.full((batch, width), pad_id, dtype=np.int32)
    trained = np.zeros((batch, width), dtype=bool)
    lengths = np.zeros(batch, dtype=np.int64)
    for row, segments in enumerate(samples):
        position = 0
        for segment, is_trained in segments:
            segment = segment[: width - position]
            ids[row, position : position + len(segment)] = segment
            trained[row, position : position + len(segment)] = is_trained
            position += len(segment)
        lengths[row] = position
    real = np.arange(width)[None, :] < lengths[:, None]
    if not shift:
        return ids, real, None, None
    token_ids, padding_mask = ids[:, :-1], real[:, :-1]
    labels = ids[:, 1:]
    weights = (trained[:, 1:] & real[:, 1:]).astype(np.float32)
    return token_ids, padding_mask, labels, weights


def _pack_rows(samples, sequence_length, pad_id):
    """Packs whole samples into rows of `sequence_length` (see
    `GemmaCausalLMPreprocessor`): token ids, padding mask, segment ids,
    labels and loss weights, each (rows, sequence_length)."""
    sequences = []
    for index, segments in enumerate(samples):
        ids = [token for segment, _ in segments for token in segment]
        trained = [is_trained for segment, is_trained in segments for _ in segment]
        if len(ids) - 1 > sequence_length:
            raise ValueError(
                f"Sample {index} has {len(ids)} tokens, more than sequence_length + 1 = "
                f"{sequence_length + 1}; packing never cuts a sample. Raise `sequence_length`, "
                "or split or shorten the sample."
            )
        sequences.append((ids, trained))
    rows = []  # each a list of sample indices
    room = 0
    for index, (ids, _) in enumerate(sequences):
        if not rows or len(ids) - 1 > room:
            rows.append([])
            room = sequence_length
        rows[-1].append(index)
        room -= len(ids) - 1
    shape = (len(rows), sequence_length)
    token_ids, labels = np.full(shape, pad_id, np.int32), np.full(shape, pad_id, np.int32)
    segment_ids, weights = np.zeros(shape, np.int32), np.zeros(shape, np.float32)
    for row, members in enumerate(rows):
        start = 0
        for segment, index in enumerate(members, start=1):
            ids, trained = sequences[index]
            end = start + len(ids) - 1
            token_ids[row, start:end], labels[row, start:end] = ids[:-1], ids[1:]
            weights[row, start:end] = trained[1:]
            segment_ids[row, start:end] = segment
            start = end
    return token_ids, segment_ids > 0, segment_ids, labels, weights


# -- feeding keras.Model.fit ---------------------------------------------------


class PreprocessedPyDataset(keras.utils.PyDataset):
    """A `keras.utils.PyDataset` that preprocesses each batch of another.

    Each batch of `source` may be what `GemmaCausalLMPreprocessor` accepts
    (strings, `{"prompts", "responses"}`, conversations), or a tuple
    `(prompts, responses)`.

    Args:
        preprocessor: a `GemmaCausalLMPreprocessor`.
        source: a `keras.utils.PyDataset` yielding raw batches.
    """

    def __init__(self, preprocessor, source):
        super().__init__(
            workers=getattr(source, "workers", 1),
            use_multiprocessing=getattr(source, "use_multiprocessing", False),
            max_queue_size=getattr(source, "max_queue_size", 10),
        )
        self.preprocessor = preprocessor
        self.source = source

    def __len__(self):
        return len(self.source)

    @property
    def num_batches(self):
        return getattr(self.source, "num_batches", len(self.source))

    def __getitem__(self, index):
        batch = self.source[index]
        if isinstance(batch, tuple):
            if len(batch) == 1:
                return self.preprocessor(batch[0])
            if len(batch) == 2:
                return self.preprocessor(batch[0], batch[1])
            raise ValueError(
                "A batch tuple must be (inputs,) or (prompts, responses), got "
                f"{len(batch)} elements."
            )
        return self.preprocessor(batch)

    def on_epoch_end(self):
        self.source.on_epoch_end()


def _is_tf_dataset(value):
    # Looks at the class names only, so that TensorFlow is never imported for
    # anything that is not already a tf.data.Dataset.
    return any(
        cls.__module__.startswith("tensorflow") and cls.__name__ == "DatasetV2"
        for cls in type(value).__mro__
    )


def is_raw_text(x):
    """Whether `x` is raw training data for `to_fit_data` (text, pairs,
    conversations, or a dataset of them), not already token ids."""
    if isinstance(x, PreprocessedPyDataset):
        return False
    if isinstance(x, (str, keras.utils.PyDataset)):
        return True
    if isinstance(x, dict):
        return "token_ids" not in x
    if isinstance(x, np.ndarray):
        return x.dtype.kind in "USO"
    if isinstance(x, (list, tuple)):
        return len(x) > 0 and isinstance(x[0], (str, dict, list))
    if _is_tf_dataset(x):
        specs = x.element_spec
        specs = specs.values() if isinstance(specs, dict) else specs if isinstance(specs, tuple) else [specs]
        return any(getattr(spec, "dtype", None) is not None and spec.dtype.name == "string" for spec in specs)
    return False


def fit_arguments(preprocessor, x, y=None, sample_weight=None, batch_size=None, validation_data=None):
    """`fit`'s data arguments with raw text turned into token ids, labels and
    loss weights (`to_fit_data`); token ids, or no preprocessor, pass through.
    Returns `{"x", "y", "sample_weight", "batch_size", "validation_data"}`."""
    arguments = {"x": x, "y": y, "sample_weight": sample_weight, "batch_size": batch_size, "validation_data": validation_data}
    if preprocessor is None or not is_raw_text(x):
        return arguments
    if sample_weight is not None:
        raise ValueError("With raw text, loss weights come from the preprocessor: pass no `sample_weight`.")
    data = to_fit_data(preprocessor, x, y, batch_size=batch_size)
    arguments.update(x=data["x"], y=data["y"], sample_weight=data["sample_weight"], batch_size=data.get("batch_size"))
    if validation_data is not None and is_raw_text(validation_data):
        val = to_fit_data(preprocessor, validation_data)
        arguments["validation_data"] = val["x"] if val["y"] is None else (val["x"], val["y"], val["sample_weight"])
    return arguments


def to_fit_data(preprocessor, x, y=None, batch_size=None):
    """Turns raw training data into keyword arguments for `keras.Model.fit`.

    Args:
        preprocessor: a `GemmaCausalLMPreprocessor`.
        x: one of
            - strings: a list or numpy array (with `y`: the prompts);
            - `{"prompts": [...], "responses": [...]}`;
            - a list of conversations;
            - a `keras.utils.PyDataset` yielding such raw batches;
            - a `tf.data.Dataset` of strings, of `{"prompts", "responses"}`
              or of `(prompts, responses)` (batched, or batched here by
              `batch_size`).
        y: responses for the prompts in `x`, or None.
        batch_size: for in-memory data, passed on to `fit`; for an unbatched
            `tf.data.Dataset`, its batch size.

    Returns:
        A dict `{"x", "y", "sample_weight"[, "batch_size"]}`: preprocessed
        numpy arrays for in-memory data (preprocessed once, up front), or a
        dataset that preprocesses each batch as it comes, with `y` and
        `sample_weight` None.

    Example:

    ```python
    model.fit(**to_fit_data(preprocessor, ["text one", "text two"], batch_size=2))
    ```
    """
    if isinstance(x, keras.utils.PyDataset):
        if y is not None:
            raise ValueError("With a PyDataset, labels come from the dataset: y must be None.")
        return {"x": PreprocessedPyDataset(preprocessor, x), "y": None, "sample_weight": None}
    if _is_tf_dataset(x):
        if y is not None:
            raise ValueError("With a tf.data.Dataset, y must be None.")
        return {
            "x": _map_tf_dataset(preprocessor, x, batch_size),
            "y": None,
            "sample_weight": None,
        }
    inputs, labels, weights = preprocessor(x, y)
    if labels.ndim == 1:  # one sample
        inputs = {key: value[None] for key, value in inputs.items()}
        labels, weights = labels[None], weights[None]
    return {"x": inputs, "y": labels, "sample_weight": weights, "batch_size": batch_size}


def _map_tf_dataset(preprocessor, dataset, batch_size):
    """Maps the preprocessor over a tf.data.Dataset through `tf.py_function`."""
    import tensorflow as tf  # Only here: the caller already uses TensorFlow.

    spec = dataset.element_spec
    if isinstance(spec, dict):
        dataset = dataset.map(lambda d: (d["prompts"], d["responses"]))
        spec = dataset.element_spec
    first = spec[0] if isinstance(spec, tuple) else spec
    if first.shape.rank == 0:
        if batch_size is None:
            raise ValueError("An unbatched tf.data.Dataset needs `batch_size`.")
        dataset = dataset.batch(batch_size)

    def to_text(tensor):
        return [item.decode("utf-8") for item in tensor.numpy().reshape(-1)]

    def run(*tensors):
        texts = [to_text(t) for t in tensors]
        x, y, w = preprocessor(*texts)
        return [x[key] for key in keys] + [y, w]

    length = preprocessor.sequence_length
    keys = ["token_ids", "padding_mask"] + (["segment_ids"] if preprocessor.packing else [])
    dtypes = [tf.int32, tf.bool] + ([tf.int32] if preprocessor.packing else [])

    def apply(*tensors):
        outputs = tf.py_function(run, list(tensors), Tout=dtypes + [tf.int32, tf.float32])
        for tensor in outputs:
            tensor.set_shape([None, length])
        return dict(zip(keys, outputs)), outputs[-2], outputs[-1]

    return dataset.map(apply, num_parallel_calls=1)
