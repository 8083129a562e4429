"""Tiny models and tokenizers, built locally (no hub is reachable on these machines).

The built-in default uses a tiny Llama with a character tokenizer. The character vocabulary (57
tokens, which vLLM pads to 64) hides whole classes of bugs, so the tests also build models shaped
like the ones users train (`build_test_model`): Qwen2-, Qwen3- and Mistral-style, behind real
production tokenizers of 32,768 and 131,072 tokens that `mistral_common` ships (no padding needed).
The code paths are the ones a real model takes.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

CHARS = string.ascii_lowercase + string.digits + " .,:;!?=+-*/()'\"\n"
# Added by model.tiny_tool_chars, for tool calls (<tool_call>{"name": ...}</tool_call>).
TOOL_CHARS = "<>{}_[]"
SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
MARKER = "rayrlhf_tiny.json"


def build_tokenizer(tool_chars: bool = False):
    """A character-level fast tokenizer: one token per character, four special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL.values())}
    for ch in CHARS + (TOOL_CHARS if tool_chars else ""):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL)


def build_tiny_model(path: str | Path, kind: str = "causal_lm", hidden_size: int = 128,
                     num_layers: int = 2, num_heads: int = 4, seed: int = 0,
                     tool_chars: bool = False) -> Path:
    """Write a randomly initialised Llama (causal LM or sequence classifier) and the tokenizer.

    head_dim stays at 32: the vLLM CPU attention kernel refuses smaller heads.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    path = Path(path)
    tokenizer = build_tokenizer(tool_chars)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=4096, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, num_labels=1,
    )
    torch.manual_seed(seed)
    model_class = {"causal_lm": LlamaForCausalLM, "reward": LlamaForSequenceClassification}[kind]
    model = model_class(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / MARKER).write_text(json.dumps({"kind": kind, "hidden_size": hidden_size,
                                           "num_layers": num_layers, "seed": seed, "tool_chars": tool_chars}))
    return path


def ensure_tiny_model(model_cfg, seed: int) -> Path:
    """Build model.path as a random model of model.tiny_hidden_size x model.tiny_layers (heads of
    32): the character-level Llama, or one of TEST_FAMILIES behind its real tokenizer
    (model.tiny_family), unless an earlier run already did."""
    path = Path(model_cfg.path)
    if not (path / MARKER).exists():
        family = model_cfg.tiny_family
        print(f"building a tiny random {family or 'character-level Llama'} model at {path}")
        if family:
            build_test_model(path, family, hidden_size=model_cfg.tiny_hidden_size,
                             num_layers=model_cfg.tiny_layers, seed=seed)
        else:
            build_tiny_model(path, hidden_size=model_cfg.tiny_hidden_size, num_layers=model_cfg.tiny_layers,
                             num_heads=model_cfg.tiny_hidden_size // 32, seed=seed,
                             tool_chars=model_cfg.tiny_tool_chars)
    return path


# family: (transformers config class name, its settings beyond the sizes, tokenizer)
TEST_FAMILIES = {
    # q/k/v biases (Qwen2's attention has them), tied embeddings, grouped-query attention.
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}, "tekken"),
    # q/k RMS norms, tied embeddings, GQA, a sentencepiece tokenizer.
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": True, "head_dim": 32}, "sentencepiece"),
    # Untied, GQA, the 131k-token tekken tokenizer (as Mistral NeMo).
    "mistral": ("MistralConfig", {"tie_word_embeddings": False, "sliding_window": None}, "tekken"),
}
REAL_TOKENIZERS = {"tekken": "tekken_240911.json",
                   "sentencepiece": "mistral_instruct_tokenizer_240323.model.v3"}


def real_tokenizer(name: str):
    """A production tokenizer from mistral_common's data folder: `tekken` (131,072 tokens, with a
    chat template) or `sentencepiece` (32,768 tokens)."""
    import shutil
    import tempfile

    import mistral_common

    source = Path(mistral_common.__file__).parent / "data" / REAL_TOKENIZERS[name]
    if name == "tekken":
        from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

        return convert_tekken_tokenizer(str(source))
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(source, Path(folder) / "tokenizer.model")
        return LlamaTokenizer.from_pretrained(folder)


def build_test_model(path: str | Path, family: str, kind: str = "causal_lm", hidden_size: int = 64,
                     num_layers: int = 2, seed: int = 0) -> Path:
    """A random `family` model (see TEST_FAMILIES) with heads of 32 and half as many KV heads, and
    its real tokenizer; `kind` causal_lm or reward (a sequence classifier with one label)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    class_name, settings, tokenizer_name = TEST_FAMILIES[family]
    tokenizer = real_tokenizer(tokenizer_name)
    heads = hidden_size // 32
    config = getattr(transformers, class_name)(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, num_labels=1, **settings)
    torch.manual_seed(seed)
    model_class = {"causal_lm": AutoModelForCausalLM, "reward": AutoModelForSequenceClassification}[kind]
    model = model_class.from_config(config)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / MARKER).write_text(json.dumps({"kind": kind, "family": family, "hidden_size": hidden_size,
                                           "num_layers": num_layers, "seed": seed}))
    return path
