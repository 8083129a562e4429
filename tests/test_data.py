"""Prompt datasets and the built-in task."""

import json

import pytest

from rayrlhf.config import load_config
from rayrlhf.data import PromptSampler, load_prompts
from rayrlhf.errors import DataError
from rayrlhf.modeling import load_tokenizer
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


CONVERSATION = [{"role": "system", "content": "Answer in \\boxed{}."},
                {"role": "user", "content": "What is 2+3?"}]


def test_conversational_prompts_go_through_the_real_chat_template(tmp_path, realistic_models):
    """A conversation (system turn included) is rendered by the tokenizer's own template, with the
    assistant turn opened; a string beside it is encoded as it is; both reach the reward as given."""
    tokenizer = load_tokenizer(realistic_models("qwen2"))
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"prompt": CONVERSATION, "answer": "5"},
                                                      {"prompt": "plain text", "answer": "7"}]))
    chat, plain = load_prompts(data_cfg(path=str(path), max_prompt_tokens=256), tokenizer, 0)
    expected = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert "Answer in \\boxed{}." in expected and "What is 2+3?" in expected
    assert chat.token_ids == tokenizer(expected, add_special_tokens=False).input_ids
    assert chat.text == CONVERSATION and chat.fields == {"answer": "5"}
    assert plain.token_ids == tokenizer("plain text").input_ids and plain.text == "plain text"
    # With data.chat_template a string is one user turn of the same template.
    (wrapped,) = load_prompts(data_cfg(path=str(path), max_prompt_tokens=256, chat_template="true"),
                              tokenizer, 0)[1:]
    assert wrapped.token_ids == tokenizer(tokenizer.apply_chat_template(
        [{"role": "user", "content": "plain text"}], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False).input_ids


@pytest.mark.parametrize("prompt, message", [
    ([{"role": "user"}], "field 'prompt' is a list but not a conversation"),
    ([], "field 'prompt' is a list but not a conversation"),
    (CONVERSATION, "the tokenizer has no chat template"),
])
def test_bad_conversations_fail_with_a_clear_message(tmp_path, prompt, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": prompt}))
    with pytest.raises(DataError, match=message):
        load_prompts(data_cfg(path=str(path)), build_tokenizer(), 0)


def test_overlong_prompts_can_be_dropped_and_counted(tmp_path, tokenizer, capsys):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": p, "n": i} for i, p in enumerate(["ab", "x" * 80, "cd"])]
    path.write_text("\n".join(map(json.dumps, rows)))
    prompts = load_prompts(data_cfg(path=str(path), overlong_prompts="drop"), tokenizer, 0)
    assert [(p.text, p.fields["n"]) for p in prompts] == [("ab", 0), ("cd", 2)]
    assert "left out 1 of 3 prompts over data.max_prompt_tokens=64" in capsys.readouterr().out
    path.write_text(json.dumps({"prompt": "x" * 80}))
    with pytest.raises(DataError, match="every one of the 1 prompts is over data.max_prompt_tokens=64"):
        load_prompts(data_cfg(path=str(path), overlong_prompts="drop"), tokenizer, 0)


def test_sampler_makes_full_passes_epoch_after_epoch(tokenizer):
    """Batches that do not divide the dataset still see every prompt once per pass."""
    prompts = load_prompts(data_cfg(synthetic_size=10), tokenizer, 0)
    sampler = PromptSampler(prompts, 4, seed=1)
    drawn = [p.text for _ in range(5) for p in sampler.next_batch()]  # 20 prompts: two passes
    assert sorted(drawn[:10]) == sorted(drawn[10:]) == sorted(p.text for p in prompts)
    assert drawn[:10] != drawn[10:]  # each pass reshuffled
