"""The cluster/ files: the manifests parse and name what their tools need, the shell scripts are
valid bash, and cluster/submit.sh runs a tiny training job on a real local Ray head."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
RAY = Path(sys.executable).parent / "ray"


def load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def test_cluster_launcher_config():
    cfg = load("ray-cluster.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in cfg, key
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert any("pip install -e" in cmd for cmd in cfg["setup_commands"])
    assert any("127.0.0.1" in cmd for cmd in cfg["head_start_ray_commands"])
    # The schema `ray up` validates against, shipped with Ray.
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)


def test_rayjob_manifest():
    job = load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    spec = job["spec"]
    assert "rayrlhf" in spec["entrypoint"] and "ray.address=auto" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    (workers,) = cluster["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]


@pytest.mark.parametrize("script", ["submit.sh", "slurm.sbatch"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(CLUSTER / script)], check=True)


def test_submit_without_arguments_prints_usage():
    result = subprocess.run([str(CLUSTER / "submit.sh")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage: cluster/submit.sh" in result.stderr


def free_ports(count):
    socks = [socket.socket() for _ in range(count)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def ray_env():
    """The environment of every `ray` subprocess: the venv's tools first, the package taken from
    the job's shipped working directory rather than this checkout, and a token of its own."""
    env = dict(os.environ, PATH=f"{RAY.parent}{os.pathsep}{os.environ.get('PATH', '')}",
               # A SIGTERM stops the head at once instead of draining it for 30 s.
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               # Token authentication on, with a token that is this test's alone; submit.sh
               # must notice it and send it.
               RAY_AUTH_TOKEN=secrets.token_hex(32))
    for name in ("PYTHONPATH", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    return env


def wait_for_job_api(address, env, head, log, timeout_s=300):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert head.poll() is None, f"ray start exited:\n{log.read_text()[-3000:]}"
        # The job CLI sends the token only in token mode (submit.sh turns it on by itself).
        probe = subprocess.run([str(RAY), "job", "list", "--address", address],
                               env=dict(env, RAY_AUTH_MODE="token"), capture_output=True, timeout=120)
        if probe.returncode == 0:
            return
        time.sleep(2)
    pytest.fail(f"the job API at {address} did not answer within {timeout_s} s")


def stop_head(head):
    """Stop only the head this test started: `ray start --block` shuts its processes down on
    SIGTERM (`ray stop` would kill every Ray process on the machine)."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


@pytest.mark.integration
@pytest.mark.skipif(not RAY.exists(), reason="no ray executable beside the interpreter")
def test_submit_runs_a_tiny_job_on_a_local_head(tmp_path, tiny_policy):
    gcs_port, dashboard_port, client_port, agent_port = free_ports(4)
    address = f"http://127.0.0.1:{dashboard_port}"
    env = ray_env()
    # Ray puts Unix sockets under --temp-dir, whose paths must stay under ~107 characters:
    # tmp_path is too deep for that.
    ray_tmp = tempfile.mkdtemp(prefix="rr", dir="/tmp")
    log = tmp_path / "ray-start.log"
    with log.open("w") as log_file:
        head = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
             f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
             "--num-cpus=8", "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_job_api(address, env, head, log)
        run = tmp_path / "run"
        result = subprocess.run(
            [str(CLUSTER / "submit.sh"), "--address", address, "conf/tiny_ppo.yaml",
             f"model.path={tiny_policy}", "model.build_tiny=false", f"output_dir={run}",
             "trainer.total_steps=2", "trainer.prompts_per_step=8", "rollout.n=2",
             "algorithm.train_batch_size=16", "actor.micro_batch_size=16",
             # No critic and no reference to start: the job's path through the cluster is what is tested.
             "algorithm.estimator=rloo", "algorithm.kl_coef=0"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-5000:]
        assert "job id: rayrlhf-" in result.stdout
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
        assert (run / "policy" / "config.json").exists()
    finally:
        stop_head(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)
