"""SFT, reward-model and DPO data: label masking, packing, pair layout, bad rows, the built-in task."""

import json
import random

import pytest
import torch

from rayrlhf.algorithms import pairwise_loss
from rayrlhf.config import load_config
from rayrlhf.data import load_supervised, pack, preference_batch, sft_batch
from rayrlhf.errors import DataError
from rayrlhf.rewards import alphabet_exact
from rayrlhf.tasks import alphabet_answer, alphabet_corrupt, alphabet_prompts
from rayrlhf.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def stage_data_cfg(stage, **overrides):
    return load_config("conf/tiny_pipeline.yaml", [f"{stage}.data.{k}={v}" for k, v in overrides.items()],
                       stage=stage)[stage].data


def test_sft_loss_covers_response_tokens_only(tmp_path):
    from transformers import AutoModelForCausalLM

    from rayrlhf.modeling import sft_token_logprobs
    from rayrlhf.tiny import build_tiny_model

    batch = sft_batch([[([5, 6], [7, 8, 2])]], pad_id=0)
    assert batch["sequences"].tolist() == [[5, 6, 7, 8, 2]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 1]]
    # A zero LM head gives uniform logits over the V tokens: each of the 3 response tokens is
    # scored, at ln(1 / V); the prompt tokens are not.
    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "m"))
    torch.nn.init.zeros_(model.lm_head.weight)
    logprobs = sft_token_logprobs(model, batch)
    assert torch.allclose(logprobs, -torch.log(torch.tensor(float(model.config.vocab_size))).repeat(3))


def test_packed_rows_restart_positions_and_number_the_examples():
    rows = pack([([1], [2, 3]), ([4, 5], [6]), ([7], [8, 9, 10, 11])], max_tokens=6)
    assert [sum(len(p) + len(r) for p, r in row) for row in rows] == [5, 6]
    batch = sft_batch(rows, pad_id=0)
    assert batch["sequences"].tolist() == [[7, 8, 9, 10, 11, 0], [1, 2, 3, 4, 5, 6]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 2, 2, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 0, 1, 2]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 1]]


def test_packing_gives_the_same_loss_as_one_example_per_row(tmp_path):
    from transformers import AutoModelForCausalLM

    from rayrlhf.modeling import sft_token_logprobs
    from rayrlhf.tiny import build_tiny_model

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "m")).eval()
    examples = [([5, 6, 7], [8, 9, 2]), ([10, 11], [12, 2]), ([13], [14, 15, 16, 2])]

    def total_nll(batch):
        with torch.no_grad():
            return -sft_token_logprobs(model, batch).sum()

    packed = sft_batch(pack(examples, max_tokens=16), pad_id=0)
    assert packed["sequences"].shape[0] == 1
    unpacked = sft_batch([[e] for e in examples], pad_id=0)
    assert torch.allclose(total_nll(packed), total_nll(unpacked), atol=1e-4)


def test_pairwise_loss_and_accuracy():
    loss, accuracy = pairwise_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    # -log sigmoid(2) and -log sigmoid(0) = ln 2, averaged; one pair ordered right, one tie.
    expected = (torch.nn.functional.softplus(torch.tensor(-2.0)) + torch.log(torch.tensor(2.0))) / 2
    assert torch.isclose(loss, expected)
    assert accuracy.item() == 0.5


def test_preference_batch_keeps_each_pair_together():
    batch = preference_batch([([1, 2], [3, 0], [4, 5, 0]), ([6], [7, 0], [8, 0])], pad_id=9)
    assert batch["sequences"].shape == (2, 2, 5)  # pairs, (chosen, rejected), P + N
    assert batch["sequences"][0].tolist() == [[1, 2, 3, 0, 9], [1, 2, 4, 5, 0]]
    assert batch["sequences"][1].tolist() == [[9, 6, 7, 0, 9], [9, 6, 8, 0, 9]]
    assert batch["response_lengths"].tolist() == [[2, 3], [2, 2]]
    assert len(batch.minibatches(1)) == 2


def write_rows(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_bad_preference_rows_are_counted_or_named(tmp_path, tokenizer, stage):
    """The reward model and DPO read preference pairs alike."""
    rows = [{"prompt": "ab=", "chosen": "cd", "rejected": "ce"}] * 6 + [
        {"prompt": "ab=", "chosen": "", "rejected": "ce"},          # empty response: skipped
        {"prompt": "ab=", "chosen": "cd", "rejected": "cd"},        # identical: skipped
        {"prompt": "ab=", "chosen": "c" * 40, "rejected": "d"},     # overlong: truncated
        {"prompt": "ab=", "chosen": "cd", "rejected": "ce"}]        # held out (last 10%)
    cfg = stage_data_cfg(stage, path=write_rows(tmp_path / "p.jsonl", rows), max_tokens=16)
    data = load_supervised(stage, cfg, "", tokenizer, 0)
    assert data.counts == {"empty_response": 1, "identical_pair": 1, "overlong_truncated": 1,
                           "overlong_dropped": 0}
    assert len(data.train) == 7 and len(data.eval) == 1
    assert max(len(e[0]) + len(e[1]) for e in data.train) == 16
    assert "1 empty response, 1 identical pair, 1 overlong truncated" in data.describe()

    cfg = stage_data_cfg(stage, path=cfg.path, max_tokens=16, overlong="drop")
    assert load_supervised(stage, cfg, "", tokenizer, 0).counts["overlong_dropped"] == 1

    missing = write_rows(tmp_path / "m.jsonl", rows[:3] + [{"prompt": "ab=", "chosen": "cd"}])
    message = rf"m.jsonl, row 3: no string field 'rejected' \(set {stage}.data.rejected_field"
    with pytest.raises(DataError, match=message):
        load_supervised(stage, stage_data_cfg(stage, path=missing), "", tokenizer, 0)


def test_sft_rows_with_custom_fields_and_an_eval_file(tmp_path, tokenizer):
    train = write_rows(tmp_path / "t.jsonl", [{"q": "ab=", "a": "cd"}] * 4)
    held = write_rows(tmp_path / "e.jsonl", [{"q": "xy=", "a": "za"}])
    cfg = stage_data_cfg("sft", path=train, eval_path=held, prompt_field="q", response_field="a")
    data = load_supervised("sft", cfg, "", tokenizer, 0)
    assert len(data.train) == 4 and len(data.eval) == 1
    prompt, response, trained = data.eval[0]
    assert tokenizer.decode(prompt) == "xy=" and response[-1] == tokenizer.eos_token_id
    assert trained == [1] * len(response)
    with pytest.raises(DataError, match="no usable training examples"):
        load_supervised("sft", stage_data_cfg("sft", path=write_rows(tmp_path / "x.jsonl", [
            {"prompt": "a", "response": " "}] * 3)), "", tokenizer, 0)


def test_alphabet_task_data_rule_and_held_out_split(tokenizer):
    assert alphabet_answer("xyz=") == "abcdefgh"
    assert alphabet_exact(["cdef="] * 3, ["ghijklmn", "ghijklm", "ghijklmno"]) == [1.0, 0.0, 0.0]
    rng = random.Random(0)
    assert all(alphabet_corrupt("ghijklmn", rng) != "ghijklmn" for _ in range(200))
    assert not set(alphabet_prompts(500, 0)) & set(alphabet_prompts(500, 1, held_out=True))
    data = load_supervised("rm", stage_data_cfg("rm", synthetic_size=50), "alphabet", tokenizer, 0)
    assert len(data.train) == 50 and len(data.eval) == 64
    assert sum(data.counts.values()) == 0


def test_a_multi_turn_demonstration_trains_on_the_assistant_turns_only(tmp_path, realistic_models):
    """Tool results are laid out as a rollout's observations are and left out of the loss: on a
    templateless tokenizer as text, on a chat one as its template writes the conversation."""
    from rayrlhf.modeling import load_tokenizer
    from rayrlhf.tiny import build_tokenizer

    turns = [{"role": "assistant", "content": "<tool_call>{}</tool_call>"},
             {"role": "tool", "content": "391"}, {"role": "assistant", "content": "391"}]
    rows = [{"prompt": "17*23=", "response": turns}] * 2
    raw = build_tokenizer(tool_chars=True)
    data = load_supervised("sft", stage_data_cfg("sft", path=write_rows(tmp_path / "t.jsonl", rows),
                                                 max_tokens=96), "", raw, 0)
    prompt, response, trained = data.train[0]
    assert raw.decode(response) == "<tool_call>{}</tool_call><tool_response>391</tool_response>391</s>"
    learnt = [t for t, k in zip(response, trained, strict=True) if k]
    assert raw.decode(learnt) == "<tool_call>{}</tool_call>391</s>"
    batch = sft_batch([data.train[:1]], pad_id=0)
    assert batch["loss_mask"].sum() == sum(trained) and batch["loss_mask"][0, :len(prompt)].sum() == 0

    chat = load_tokenizer(realistic_models("qwen2"))
    data = load_supervised("sft", stage_data_cfg("sft", path=write_rows(tmp_path / "c.jsonl", rows),
                                                 chat_template=True, max_tokens=96), "", chat, 0)
    prompt, response, trained = data.train[0]
    conversation = [{"role": "user", "content": "17*23="}, turns[0],
                    {"role": "user", "content": "<tool_response>391</tool_response>"}, turns[2]]
    rendered = chat.apply_chat_template(conversation, tokenize=False)
    expected = chat(rendered, add_special_tokens=False)["input_ids"]
    assert prompt + response == expected
    learnt = [t for t, k in zip(response, trained, strict=True) if k]
    assert chat.decode(learnt) == "<tool_call>{}</tool_call></s>391</s>"
    with pytest.raises(DataError, match="must end with an assistant message"):
        load_supervised("sft", stage_data_cfg("sft", path=write_rows(tmp_path / "bad.jsonl", [
            {"prompt": "a", "response": turns[:2]}] * 2)), "", raw, 0)
