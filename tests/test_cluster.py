"""The cluster/ files: the manifests parse and name what their tools need, the shell scripts are
valid bash. cluster/submit.sh running a job on a real cluster is in test_multinode.py."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from rayrlhf.config import load_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"


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
    # The pools the preset it runs places its roles on.
    preset = load_config(spec["entrypoint"].split("--config ")[1].split()[0])
    pools = {group["rayStartParams"]["labels"]: group for group in cluster["workerGroupSpecs"]}
    assert set(pools) == {f"pool={where.node_labels.pool}" for where in preset.ray.roles.values()
                          if where.node_labels}
    for group in pools.values():
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]


@pytest.mark.parametrize("script", ["submit.sh", "slurm.sbatch"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(CLUSTER / script)], check=True)


def test_submit_without_arguments_prints_usage():
    result = subprocess.run([str(CLUSTER / "submit.sh")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage: cluster/submit.sh" in result.stderr
