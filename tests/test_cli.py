"""The command line: bad input ends with one clear message and a non-zero exit, before any actor."""

import subprocess
import sys

import pytest

from rayrlhf.cli import main


@pytest.mark.parametrize("args, message", [
    (["trainer.totl_steps=3"], "unknown config key 'trainer.totl_steps'"),
    (["model.path=/no/such/model", "model.build_tiny=false"], "model.path '/no/such/model' does not exist"),
    (["reward.model_path=/no/such/rm"], "reward.model_path '/no/such/rm' does not exist"),
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
