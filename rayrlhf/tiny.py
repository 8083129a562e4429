"""Tiny models and a character tokenizer, built locally (no hub is reachable on these machines).

The built-in default and the tests use them; the code paths are the ones a real model takes.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

CHARS = string.ascii_lowercase + string.digits + " .,:;!?=+-*/()'\"\n"
SPECIAL = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
MARKER = "rayrlhf_tiny.json"


def build_tokenizer():
    """A character-level fast tokenizer: one token per character, four special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL.values())}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL)


def build_tiny_model(path: str | Path, kind: str = "causal_lm", hidden_size: int = 128,
                     num_layers: int = 2, num_heads: int = 4, seed: int = 0) -> Path:
    """Write a randomly initialised Llama (causal LM or sequence classifier) and the tokenizer.

    head_dim stays at 32: the vLLM CPU attention kernel refuses smaller heads.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    path = Path(path)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=512, tie_word_embeddings=False,
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
                                           "num_layers": num_layers, "seed": seed}))
    return path


def ensure_tiny_model(model_cfg, seed: int) -> Path:
    """Build model.path as a tiny model of model.tiny_hidden_size x model.tiny_layers (heads of
    32) unless an earlier run already did."""
    path = Path(model_cfg.path)
    if not (path / MARKER).exists():
        print(f"building a tiny random model at {path}")
        build_tiny_model(path, hidden_size=model_cfg.tiny_hidden_size, num_layers=model_cfg.tiny_layers,
                         num_heads=model_cfg.tiny_hidden_size // 32, seed=seed)
    return path
