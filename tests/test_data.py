"""Prompt datasets and the built-in task."""

import json

import pytest

from rayrlhf.config import load_config
from rayrlhf.data import PromptSampler, load_prompts
from rayrlhf.errors import DataError
from rayrlhf.rewards import alphabet_reward
from rayrlhf.tasks import alphabet_prompts
from rayrlhf.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def data_cfg(**overrides):
    return load_config("conf/tiny_ppo.yaml", [f"data.{k}={v}" for k, v in overrides.items()]).data


def test_alphabet_reward_counts_successors():
    assert alphabet_reward("cdef", "ghijklmn") == 1.0
    assert alphabet_reward("xyz", "abcdefgh") == 1.0  # wraps z -> a
    assert alphabet_reward("cdef", "ghxyzzzz") == 4 / 8  # g, h, y (after x), z (after y)
    assert alphabet_reward("cdef", "gh") == 2 / 8  # stopping early earns less
    assert alphabet_reward("cdef", "") == 0.0
    assert all(4 <= len(p) <= 7 and p.endswith("=") for p in alphabet_prompts(50, seed=0))


def test_jsonl_parquet_and_datasets_dir_load_the_same_prompts(tmp_path, tokenizer):
    rows = [{"question": "abc", "other": 1}, {"question": "hello", "other": 2}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    import datasets

    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "hf"))
    for path in (jsonl, tmp_path / "p.parquet", tmp_path / "hf"):
        prompts = load_prompts(data_cfg(path=str(path), prompt_field="question"), tokenizer, 0)
        assert [p.text for p in prompts] == ["abc", "hello"]
        assert prompts[0].token_ids == tokenizer("abc").input_ids


@pytest.mark.parametrize("content, field, message", [
    ("", "prompt", "is empty"),
    ('{"prompt": "ok"}\n{oops\n', "prompt", "p.jsonl:2: not valid JSON"),
    ('{"text": "abc"}\n', "prompt", "row 0: no non-empty string field 'prompt'"),
    ('{"prompt": "' + "a" * 100 + '"}\n', "prompt",
     "prompt 0 has 100 tokens, more than data.max_prompt_tokens=64"),
])
def test_bad_datasets_fail_with_a_clear_message(tmp_path, tokenizer, content, field, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_prompts(data_cfg(path=str(path), prompt_field=field), tokenizer, 0)
    assert message in str(err.value)


def test_missing_and_unsupported_files(tmp_path, tokenizer):
    with pytest.raises(DataError, match="dataset not found"):
        load_prompts(data_cfg(path=str(tmp_path / "nope.jsonl")), tokenizer, 0)
    (tmp_path / "p.csv").write_text("prompt\nabc\n")
    with pytest.raises(DataError, match="unsupported format"):
        load_prompts(data_cfg(path=str(tmp_path / "p.csv")), tokenizer, 0)


def test_sampler_is_reproducible_and_covers_every_prompt(tokenizer):
    prompts = load_prompts(data_cfg(synthetic_size=10), tokenizer, 0)
    first = [p.text for p in PromptSampler(prompts, 5, seed=3).next_batch()]
    again = [p.text for p in PromptSampler(prompts, 5, seed=3).next_batch()]
    assert first == again
    sampler = PromptSampler(prompts, 10, seed=3)
    assert sorted(p.text for p in sampler.next_batch()) == sorted(p.text for p in prompts)


def test_chat_template_wraps_each_prompt(tmp_path, tokenizer):
    tokenizer.chat_template = "{% for m in messages %}q: {{ m['content'] }}{% endfor %} a:"
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "abc"}\n')
    prompts = load_prompts(data_cfg(path=str(path), chat_template="true"), tokenizer, 0)
    assert tokenizer.decode(prompts[0].token_ids) == "q: abc a:"
