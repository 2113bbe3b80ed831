"""Classification by next-token label probabilities (ShieldGemma's yes/no).

ShieldGemma's model card scores a prompt as
`softmax(logits[0, -1, [vocab["Yes"], vocab["No"]]])[0]`, the probability
that the text violates the policy. `label_probabilities` does that for a
batch: one forward pass over the prompts, left-padded so every row's last
real token sits in the last column, then the softmax over the labels'
logits there.
"""

import numpy as np
from keras import ops

from keras_gemma.generation import prompts as prompts_lib


def label_ids(lm, labels):
    """Token ids of `labels`: ids as given, text as its one token."""
    if isinstance(labels, (str, bytes, int)) or len(labels) < 2:
        raise ValueError(f"`labels` must be two or more labels (text or token ids), e.g. ('Yes', 'No'); got {labels!r}.")
    vocabulary_size = lm.config.vocabulary_size
    ids = []
    for label in labels:
        if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
            token_id = int(label)
        elif isinstance(label, (str, bytes)):
            tokenizer = prompts_lib._need_tokenizer(lm, f"A label given as text ({label!r})")
            tokens = [int(t) for t in tokenizer.tokenize(label)]
            if len(tokens) != 1:
                pieces = [tokenizer.id_to_token(t) for t in tokens]
                raise ValueError(
                    f"Label {label!r} is {len(tokens)} tokens {pieces}, not one: `classify` compares the "
                    "logits of single tokens. Give a label that is one vocabulary piece, or its token id."
                )
            token_id = tokens[0]
        else:
            raise TypeError(f"A label must be text or a token id, got {label!r}.")
        if not 0 <= token_id < vocabulary_size:
            raise ValueError(f"Label token id {token_id} is outside the vocabulary (size {vocabulary_size}).")
        ids.append(token_id)
    return ids


def label_probabilities(lm, prompts, labels=("Yes", "No")):
    """See `GemmaCausalLM.classify`."""
    ids = label_ids(lm, labels)
    batch = prompts_lib.normalize_inputs(lm, prompts)
    if any(len(row) == 0 for row in batch.ids):
        raise ValueError("Every prompt needs at least one real token.")
    width = max(len(row) for row in batch.ids)
    token_ids = np.zeros((len(batch.ids), width), np.int32)
    mask = np.zeros((len(batch.ids), width), bool)
    for i, row in enumerate(batch.ids):  # left-padded: the last column is every row's last token
        token_ids[i, width - len(row):], mask[i, width - len(row):] = row, True
    hidden, _ = lm.backbone.hidden_states(token_ids, mask, last_only=True)  # (b, 1, d)
    logits = lm.logits(hidden)[:, 0, :]  # (b, vocab), float32, soft-capped as the model's output
    chosen = ops.take(logits, ops.convert_to_tensor(np.asarray(ids, np.int32)), axis=-1)  # (b, labels)
    probabilities = ops.convert_to_numpy(ops.softmax(chosen, axis=-1)).astype(np.float32)
    return probabilities[0] if batch.scalar else probabilities
