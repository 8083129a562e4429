"""A Ray cluster of several nodes on this machine, started as on a real one (`ray start --head`, then
`ray start --address` per worker node, each with its own resources and labels): roles placed on
nodes by label, the weight-sync transport chosen by node, a run submitted through
cluster/submit.sh, tensor-parallel engines, and worker nodes killed mid-run (their raylet and every
process of theirs, SIGKILL)."""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"
# Worker nodes for the rollout engines; the head holds every other role.
ROLLOUT_NODES = 2


def free_ports(count):
    socks = [socket.socket() for _ in range(count)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def ray_env():
    """The environment of every `ray` process: the venv's tools first, the package taken from the
    job's shipped working directory rather than this checkout, and a token of its own."""
    env = dict(os.environ, PATH=f"{RAY.parent}{os.pathsep}{os.environ.get('PATH', '')}",
               # A SIGTERM stops a node at once instead of draining it for 30 s.
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               # The head's checks of each node every second instead of every 3 (5 missed ones
               # declare a killed node dead); a check still waits Ray's 10 s for a busy raylet.
               RAY_health_check_period_ms="1000",
               # Token authentication on, with a token that is this test's alone; submit.sh
               # must notice it and send it (the drivers below are told to send it).
               RAY_AUTH_TOKEN=secrets.token_hex(32))
    for name in ("PYTHONPATH", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    return env


class LocalCluster:
    """A head (labelled pool=train) and worker nodes (pool=rollout), each a `ray start --block`
    process of this test's: a node is killed as its process tree (Ray's workers leave its process
    group, so a group kill would miss them)."""

    def __init__(self, tmp: Path):
        self.env = ray_env()
        # Ray puts Unix sockets under --temp-dir, whose paths must stay under ~107 characters.
        self.ray_tmp = tempfile.mkdtemp(prefix="rr", dir="/tmp")
        self.logs = tmp
        self.nodes: list[subprocess.Popen] = []
        gcs, dashboard = free_ports(2)
        self.gcs = f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        try:
            self._start("head", ["--head", f"--port={gcs}", "--num-cpus=4", "--labels=pool=train",
                                 "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                                 f"--ray-client-server-port={free_ports(1)[0]}",
                                 f"--temp-dir={self.ray_tmp}"])
            self._wait_for_job_api()
            for i in range(ROLLOUT_NODES):
                self._start(f"rollout{i}", [f"--address={self.gcs}", "--num-cpus=2", "--labels=pool=rollout"])
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, args: list[str]) -> None:
        # Every port of its own: nodes started side by side on one machine would race for Ray's.
        ports = free_ports(5)
        log = self.logs / f"ray-{name}.log"
        with log.open("w") as log_file:
            node = subprocess.Popen(
                [str(RAY), "start", "--block", "--node-ip-address=127.0.0.1", *args,
                 "--object-store-memory=200000000", "--disable-usage-stats",
                 f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
                 f"--metrics-export-port={ports[2]}", f"--dashboard-agent-listen-port={ports[3]}",
                 f"--runtime-env-agent-port={ports[4]}"],
                # A head turns token authentication on by itself when given a token; a worker
                # node, like any other client, only in token mode.
                env=dict(self.env, RAY_AUTH_MODE="token"), stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.nodes.append(node)
        deadline = time.time() + 180
        while "Ray runtime started" not in log.read_text():
            assert node.poll() is None and time.time() < deadline, \
                f"ray start {name}:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)

    def _wait_for_job_api(self, timeout_s=300):
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            probe = subprocess.run([str(RAY), "job", "list", "--address", self.dashboard], timeout=120,
                                   capture_output=True, env=dict(self.env, RAY_AUTH_MODE="token"))
            if probe.returncode == 0:
                return
            time.sleep(2)
        pytest.fail(f"the job API at {self.dashboard} did not answer within {timeout_s} s")

    def node_of(self, pid: int) -> subprocess.Popen:
        """The node whose processes include `pid`."""
        ancestors = {parent.pid for parent in psutil.Process(pid).parents()}
        return next(node for node in self.nodes if node.pid in ancestors)

    def kill(self, node: subprocess.Popen) -> None:
        """SIGKILL to the node's raylet and every process it started (workers, agents), at once."""
        processes = [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]
        for process in processes:
            process.kill()
        node.wait()

    def stop(self) -> None:
        """Only the nodes this test started (`ray stop` would stop every Ray process of the machine);
        workers first, the head last, each on SIGTERM (`ray start --block` shuts its node down)."""
        for node in reversed(self.nodes):
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
                try:
                    node.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(node.pid, signal.SIGKILL)
                    node.wait()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nodes = LocalCluster(tmp_path_factory.mktemp("cluster"))
    yield nodes
    nodes.stop()


def tiny_run(run: Path, policy: str, *overrides: str) -> list[str]:
    """A short RLOO run of the tiny policy (no critic, no reference: the roles' placement is what
    is tested), on `--config conf/tiny_ppo.yaml`."""
    return [f"model.path={policy}", "model.build_tiny=false", f"output_dir={run}",
            "trainer.prompts_per_step=8", "rollout.n=2", "algorithm.train_batch_size=16",
            "actor.micro_batch_size=16", "algorithm.estimator=rloo", "algorithm.kl_coef=0", *overrides]


def test_submit_runs_a_job_whose_engines_share_the_actors_node(cluster, tmp_path, tiny_policy):
    """cluster/submit.sh to the cluster's head; the engine (tensor-parallel, 2 workers) and the
    actor are both placed on the head's label (the reward on a worker node), so their weights go
    by shared memory, which both engine workers map."""
    run = tmp_path / "run"
    result = subprocess.run(
        [str(REPO / "cluster" / "submit.sh"), "--address", cluster.dashboard, "conf/tiny_ppo.yaml",
         *tiny_run(run, tiny_policy, "trainer.total_steps=3", "rollout.tensor_parallel_size=2",
                   "rollout.cpus_per_engine=2", "ray.roles.rollout.node_labels.pool=train",
                   "ray.roles.actor.node_labels.pool=train", "ray.roles.reward.node_labels.pool=rollout")],
        cwd=tmp_path, env=cluster.env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "job id: rayrlhf-" in result.stdout
    placed = re.search(r"placed: (.*)", output)[1]
    nodes = dict(re.findall(r"(\w+) x\d on ([\d./a-f]+)", placed))
    assert nodes["rollout"] == nodes["actor"] != nodes["reward"], placed
    assert "weight sync by shared memory" in placed
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Steps 2 and 3 sampled with the weights trained at steps 1 and 2, from both workers' shards.
    assert len(metrics) == 3 and all(m["sync/logprob_gap_mean"] < 1e-3 for m in metrics[1:]), metrics
    assert (run / "policy" / "config.json").exists()


def titled(prefix: str) -> list[psutil.Process]:
    """The processes whose title (Ray's ray::<Class>, vLLM's VLLM::Worker_TP<i>) starts with `prefix`."""
    return [process for process in psutil.process_iter(["cmdline"])
            if " ".join(process.info["cmdline"] or []).startswith(prefix)]


class NodeKiller(threading.Thread):
    """Kills the node of the engine's processes once `steps` (a list, consumed in order) iterations
    are logged: the first the node of the engine then, and so on."""

    def __init__(self, cluster: LocalCluster, run: Path, steps: list[int]):
        super().__init__(daemon=True)
        self.cluster, self.run_dir, self.steps = cluster, run, steps
        self.killed_at: list[float] = []

    def run(self):
        self.started = time.monotonic()
        deadline = time.monotonic() + 600
        for after in self.steps:
            while time.monotonic() < deadline:
                metrics = self.run_dir / "metrics.jsonl"
                logged = len(metrics.read_text().splitlines()) if metrics.exists() else 0
                engines = titled("ray::VLLMEngine")
                if logged >= after and engines:
                    self.cluster.kill(self.cluster.node_of(engines[0].pid))
                    self.killed_at.append(time.monotonic())
                    break
                time.sleep(0.05)


def test_lost_engine_nodes_restart_it_elsewhere_then_stop_the_run(cluster, tmp_path, tiny_policy):
    """A tensor-parallel engine (2 workers) on a rollout node, the actor on the head: the weights go
    by a gloo broadcast into both workers. Its node is killed: the engine starts again, whole, on the
    other rollout node. That one is killed too: with no node left that may hold it, the run stops
    within ray.node_loss_timeout_s, naming the node, the engine and the checkpoint."""
    run = tmp_path / "run"
    killer = NodeKiller(cluster, run, [2, 5])
    killer.start()
    driver = subprocess.run(
        [sys.executable, "-m", "rayrlhf.cli", "train", "--config", "conf/tiny_ppo.yaml",
         *tiny_run(run, tiny_policy, "trainer.total_steps=20", "trainer.checkpoint_every=1",
                   f"ray.address={cluster.gcs}", "ray.node_loss_timeout_s=15",
                   "rollout.tensor_parallel_size=2", "rollout.cpus_per_engine=2",
                   "ray.roles.rollout.node_labels.pool=rollout", "ray.roles.actor.node_labels.pool=train",
                   "ray.roles.reward.node_labels.pool=train")],
        cwd=REPO, env=dict(cluster.env, RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=600)
    stopped_at = time.monotonic()
    killer.join(timeout=1)
    print(f"node kills at {[t - killer.started for t in killer.killed_at]} s, run stopped at "
          f"{stopped_at - killer.started:.1f} s")
    output = driver.stdout + driver.stderr
    assert len(killer.killed_at) == 2, output[-5000:]
    assert driver.returncode != 0, output[-5000:]
    assert "weight sync by gloo broadcast" in output
    assert "rollout engine(s) [0] died; restarting them" in output
    message = re.search(r"node ([\d.]+/[0-9a-f]{6}) was lost \(its raylet stopped\) with rollout engine 0 "
                        r"and no node had room for them within 15 s \(ray.node_loss_timeout_s\); .* "
                        r"resume from (\S+/checkpoints/step_\d+) with resume=true", output)
    assert message, output[-5000:]
    # Detection (Ray's health checks of the node) and the wait for room, not a hang in a collective.
    assert stopped_at - killer.killed_at[1] < 120
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert 5 <= len(metrics) < 20
    assert Path(message[2]).name == f"step_{len(metrics):06d}"
    # After the restart the engine sampled with the trained weights, loaded by both its workers.
    gaps = [m["sync/logprob_gap_mean"] for m in metrics]
    assert all(gap < 1e-3 for gap in gaps), gaps
    # No engine worker outlives its engine: those of the killed nodes, nor the restarted engine's.
    deadline = time.monotonic() + 30
    while titled("VLLM::Worker"):
        assert time.monotonic() < deadline, "a vLLM worker process outlived the run"
        time.sleep(1)
