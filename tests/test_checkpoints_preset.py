"""`checkpoints/preset.py` builds the classes its callers name, as keras-hub's
tasks do (`backbone_cls`, `preprocessor_cls`, `tokenizer_cls`), so it imports
no model module and the models import it at module top (no import circle)."""

import ast
import inspect

import keras

import keras_gemma
from keras_gemma.checkpoints import preset
from tokenizer_fixtures import train_tiny_spm

MODEL_MODULES = {"backbone", "causal_lm", "tokenizer", "preprocessor", "layers", "generation"}


def test_preset_imports_no_model_module():
    tree = ast.parse(inspect.getsource(preset))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):  # anywhere, function-local too
            imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    assert not [name for name in imported if MODEL_MODULES & set(name.split("."))], imported
    assert keras_gemma.GemmaCausalLM.backbone_cls is keras_gemma.GemmaBackbone
    assert keras_gemma.GemmaCausalLM.preprocessor_cls is keras_gemma.GemmaCausalLMPreprocessor
    assert keras_gemma.GemmaCausalLMPreprocessor.tokenizer_cls is keras_gemma.GemmaTokenizer


class MyTokenizer(keras_gemma.GemmaTokenizer):
    pass


class MyPreprocessor(keras_gemma.GemmaCausalLMPreprocessor):
    tokenizer_cls = MyTokenizer


class MyBackbone(keras_gemma.GemmaBackbone):
    pass


class MyCausalLM(keras_gemma.GemmaCausalLM):
    backbone_cls = MyBackbone
    preprocessor_cls = MyPreprocessor


def test_from_preset_builds_the_class_attributes(tmp_path):
    """A subclass names its own parts, and `from_preset` builds those."""
    tokenizer = keras_gemma.GemmaTokenizer(str(train_tiny_spm(tmp_path / "tokenizer.model")))
    config = keras_gemma.GemmaConfig(
        vocabulary_size=tokenizer.vocabulary_size(), num_layers=1, hidden_dim=16, num_query_heads=2,
        num_key_value_heads=1, head_dim=8, intermediate_dim=32,
    )
    keras.utils.set_random_seed(0)
    lm = keras_gemma.GemmaCausalLM(keras_gemma.GemmaBackbone(config), keras_gemma.GemmaCausalLMPreprocessor(tokenizer))
    lm.save_to_preset(tmp_path / "preset")
    loaded = MyCausalLM.from_preset(str(tmp_path / "preset"))
    assert type(loaded) is MyCausalLM and type(loaded.backbone) is MyBackbone
    assert type(loaded.preprocessor) is MyPreprocessor and type(loaded.preprocessor.tokenizer) is MyTokenizer
    assert type(MyPreprocessor.from_preset(str(tmp_path / "preset")).tokenizer) is MyTokenizer
    assert type(MyBackbone.from_preset(str(tmp_path / "preset"), load_weights=False)) is MyBackbone
    assert type(MyTokenizer.from_preset(str(tmp_path / "preset"))) is MyTokenizer
