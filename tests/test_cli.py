"""The command line: bad input ends with one clear message and a non-zero exit, before any actor."""

import subprocess
import sys

import pytest

from rayrlhf.cli import main


@pytest.mark.parametrize("args, message", [
    (["trainer.totl_steps=3"], "unknown config key 'trainer.totl_steps'"),
    (["data.task=sorting"],
     "'data.task' must be empty or a built-in task (alphabet, calculator); got 'sorting'"),
    (["actor.peft.rank=0"], "config key 'actor.peft.rank' must be >= 1"),
    (["actor.lora.rank=4"], "unknown config key 'actor.lora': LoRA moved to actor.peft (method=lora"),
    (["model.path=/no/such/model", "model.build_tiny=false"], "model.path '/no/such/model' does not exist"),
    (["reward.models=[{path: /no/such/rm}]"], "reward.models[0].path '/no/such/rm' does not exist"),
    (["reward.function=no_such.py"], "reward.function 'no_such.py': no built-in of that name"),
    (["data.path=/no/such.jsonl"], "dataset not found: /no/such.jsonl"),
    (["data.max_prompt_tokens=4"], "more than data.max_prompt_tokens=4"),
])
def test_bad_input_exits_2_with_a_message(args, message, capsys, tmp_path):
    code = main(["train", "--config", "conf/tiny_ppo.yaml", f"output_dir={tmp_path}",
                 f"model.path={tmp_path / 'tiny'}", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("rayrlhf: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command, args, message", [
    ("sft", ["sft.batch_size=30"], "'sft.batch_size' (30) must be a multiple of sft.num_ranks x sft.micro"),
    ("rm", ["rm.data.overlong=cut"], "'rm.data.overlong' must be one of truncate, drop; got 'cut'"),
    ("rm", ["rm.model_path=/no/such/sft"], "rm.model_path '/no/such/sft' does not exist"),
    ("sft", ["sft.data.path=/no/such.jsonl"], "dataset not found: /no/such.jsonl"),
    ("pipeline", ["pipeline.stages=[rm,sft]"], "'pipeline.stages' must be in the order sft, rm, ppo"),
    ("pipeline", ["pipeline.rerun=[ppo]", "pipeline.stages=[sft]"], "'pipeline.rerun' names 'ppo'"),
    ("pipeline", ["eval.function=nope"], "'eval.function' must be a built-in"),
])
def test_bad_stage_input_exits_2_with_a_message(command, args, message, capsys, tmp_path):
    code = main([command, "--config", "conf/tiny_pipeline.yaml", f"output_dir={tmp_path}",
                 f"model.path={tmp_path / 'tiny'}", *args])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("rayrlhf: error: ") and message in err
    assert not (tmp_path / "sft").exists()


def test_console_script_exit_code():
    proc = subprocess.run([sys.executable, "-m", "rayrlhf.cli", "train", "bogus.key=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "override 'bogus.key=1': unknown config key 'bogus'" in proc.stderr


def test_serve_rm_command_serves_a_reward_model(tmp_path):
    """`rayrlhf serve-rm` answers a scoring request on loopback, with its bearer token."""
    from rayrlhf.reward_server import RemoteRewardClient
    from rayrlhf.tiny import build_tiny_model
    from rayrlhf.trainer import free_port

    model = build_tiny_model(tmp_path / "rm", kind="reward")
    port = free_port("127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-m", "rayrlhf.cli", "serve-rm", "--model", str(model),
                             "--port", str(port), "--token", "t0k"], stdout=subprocess.PIPE, text=True)
    try:
        assert "listening on http://127.0.0.1:" in proc.stdout.readline()
        client = RemoteRewardClient(f"http://127.0.0.1:{port}", token="t0k", timeout_s=10)
        scores = client.score(["abc", "xyz"], ["def", "abc"])
        assert len(scores) == 2 and scores[0] != scores[1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert main(["serve-rm", "--model", str(tmp_path / "missing")]) == 2


def test_remote_reward_failure_inside_an_actor_gives_one_line(tmp_path, prompt_file, tiny_policy, capsys):
    """The reward actor's client gives up on a dead server: the run stops with the client's message."""
    from rayrlhf.trainer import free_port

    dead = free_port("127.0.0.1")  # nothing listens here
    code = main(["train", "--config", "conf/tiny_ppo.yaml", f"output_dir={tmp_path}",
                 f"model.path={tiny_policy}", "model.build_tiny=false", "reward.function=",
                 f"data.path={prompt_file}",
                 f'reward.remote=[{{url: "http://127.0.0.1:{dead}"}}]', "reward.remote_retries=1",
                 "trainer.total_steps=1", "trainer.prompts_per_step=16", "algorithm.train_batch_size=16",
                 "actor.micro_batch_size=16", "critic.micro_batch_size=16"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        f"rayrlhf: error: reward server http://127.0.0.1:{dead}/score failed after 2 attempts")
    assert not any("Traceback" in line for line in err)
