"""cluster.yaml: valid for the installed Ray's cluster launcher (its JSON schema and the same prepare/validate
steps `ray up` runs before it calls the cloud), token auth on everywhere, and sized for the GPU configs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_validates_against_the_installed_ray_schema(cluster):
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    broken = {**cluster, "available_node_types": {**cluster["available_node_types"], "gpu_worker": {"min_workers": 0}}}
    with pytest.raises(jsonschema.ValidationError):  # the schema really checks node types (needs resources, node_config)
        jsonschema.validate(broken, schema)


def test_ray_up_config_steps_accept_it(cluster):
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(json.loads(json.dumps(cluster)))  # AWS defaults merged, per-type min/max filled
    validate_config(prepared)
    assert prepared["head_node_type"] == "head" and prepared["provider"]["type"] == "aws"


def test_cpu_head_autoscaling_gpu_workers(cluster):
    assert cluster["cluster_name"] and cluster["provider"]["type"] == "aws" and re.fullmatch(r"[a-z]{2}-[a-z]+-\d", cluster["provider"]["region"])
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and re.match(r"(m|c|r)\d", head["node_config"]["InstanceType"])
    gpu = [t for name, t in types.items() if name != cluster["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 < gpu[0]["max_workers"]
    assert re.match(r"(g|p)\d", gpu[0]["node_config"]["InstanceType"])
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert sum(t["max_workers"] for t in workers) <= cluster["max_workers"]


def test_sized_for_the_gpu_pretraining_config(cluster):
    from userfm.config import load_config
    from userfm.train.pretrain_config import PretrainConfig

    cfg = load_config(PretrainConfig, ROOT / "experiments" / "pretrain" / "gpu-cluster.yaml", data="s3://b/ds", out="s3://b/run")
    gpu = next(t for t in cluster["available_node_types"].values() if t["resources"].get("GPU", 0) >= 1)
    assert cfg.use_gpu and cfg.num_workers <= gpu["max_workers"]
    assert cfg.cpus_per_worker < gpu["resources"]["CPU"]  # room left on each node for Ray Data


def test_installs_the_pinned_project_and_keeps_token_auth_on(cluster):
    setup = " ".join(cluster["setup_commands"])
    assert re.search(r"pip install [^;&|]*-c constraints\.txt -e \.", setup)
    assert (ROOT / "constraints.txt").is_file() and cluster["file_mounts"]["/home/ubuntu/userfm"] == "."
    head = " ".join(cluster["head_start_ray_commands"])
    worker = " ".join(cluster["worker_start_ray_commands"])
    assert "ray start --head" in head and "RAY_AUTH_MODE=token" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker and "RAY_AUTH_MODE=token" in worker
    assert "~/.ray/auth_token" in cluster["file_mounts"].values()  # one token on every node and the client
    text_without_comments = "\n".join(line.split(" #")[0] for line in (ROOT / "cluster.yaml").read_text().splitlines()
                                      if not line.lstrip().startswith("#"))
    assert "RAY_AUTH_MODE=disabled" not in text_without_comments
