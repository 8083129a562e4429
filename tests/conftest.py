import os

import pytest

# The engine runs inside its Ray actor (and inside this process, where a test starts one).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory):
    from rayrlhf.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "policy", seed=0))


@pytest.fixture(scope="session")
def realistic_models(tmp_path_factory):
    """family -> path of a random model shaped like a real one, behind a real 32k or 131k-token
    tokenizer (rayrlhf.tiny.TEST_FAMILIES); each is built once per session, on first use."""
    from rayrlhf.tiny import build_test_model

    built = {}

    def get(family: str, kind: str = "causal_lm") -> str:
        if (family, kind) not in built:
            folder = tmp_path_factory.mktemp("models") / f"{family}-{kind}"
            seed = 0 if kind == "causal_lm" else 1
            built[family, kind] = str(build_test_model(folder, family, kind, seed=seed))
        return built[family, kind]

    return get


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory):
    from rayrlhf.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "reward", kind="reward", seed=1))


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory):
    """A JSONL prompt set with a `target` column: the letter that follows each prompt's last."""
    import json

    from rayrlhf.tasks import alphabet_answer, alphabet_prompts

    rows = [{"prompt": p, "target": alphabet_answer(p)[0]} for p in alphabet_prompts(64, seed=5)]
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for every integration test; each run removes its own actors."""
    import ray

    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
