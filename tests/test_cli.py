"""The command line: bad input ends with one clear message and a non-zero exit, before any actor."""

import subprocess
import sys

import pytest

from rayrlhf.cli import main


@pytest.mark.parametrize("args, message", [
    (["trainer.totl_steps=3"], "unknown config key 'trainer.totl_steps'"),
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


def test_console_script_exit_code():
    proc = subprocess.run([sys.executable, "-m", "rayrlhf.cli", "train", "bogus.key=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "override 'bogus.key=1': unknown config key 'bogus'" in proc.stderr


def test_serve_rm_command_serves_a_reward_model(tmp_path):
    """`rayrlhf serve-rm` answers a scoring request on loopback, with its bearer token."""
    import socket

    from rayrlhf.reward_server import RemoteRewardClient
    from rayrlhf.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "rm", kind="reward")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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
