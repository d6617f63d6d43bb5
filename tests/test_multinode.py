"""The pipeline on a two-node Ray cluster started by the test on this machine (slow).

A head and a worker node are separate `ray start --block` processes with their own ports, temp dirs
and a custom resource each (`node_head`, `node_worker`), token auth on with a token file of the test.
Every stage runs as the `userfm` CLI against the cluster with `--address` (the commands the README lists
for cluster.yaml), on a filesystem both nodes see (here: the same disk):

    ingest -> pretrain (2 Ray Train workers, 1.5 CPUs each on 2-CPU nodes: one per node) -> embed -> serve

Checks: the two Train workers ran on the two different nodes (Ray's state API), the exported model loads
without Ray and reproduces the table `userfm embed` wrote on the cluster, and the served app answers with
that table. The test stops only what it started: SIGTERM to each `ray start --block` (which ends that
node's processes), then anything still naming one of its temp dirs (never `ray stop`, which would end
every Ray of the user on the host).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from test_jobs import BIN, base_env, free_ports, processes_of, run, stop_head

PY = sys.executable


def start_node(cmd: list[str], env: dict, log: Path) -> tuple[subprocess.Popen, object]:
    f = open(log, "w")
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", *cmd], env=env, stdout=f, stderr=subprocess.STDOUT,
                            start_new_session=True), f


def node_ports() -> list[str]:
    names = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
             "--metrics-export-port", "--node-manager-port", "--object-manager-port"]
    return [a for name, port in zip(names, free_ports(len(names))) for a in (name, str(port))]


def wait_nodes(env: dict, dash: str, n: int, deadline: float, procs: list, logs: list[Path]) -> list[dict]:
    """Until the cluster lists ``n`` alive nodes (state API through the dashboard); fail fast if a node exits."""
    script = ("import json, ray.util.state as s; print(json.dumps([dict(node_id=x.node_id, state=x.state, "
              f"resources=x.resources_total) for x in s.list_nodes(address={dash!r})]))")
    last = None
    while time.time() < deadline:
        for p, log in zip(procs, logs):
            if p.poll() is not None:
                raise AssertionError(f"ray start exited with {p.returncode}:\n{log.read_text()[-5000:]}")
        r = run([PY, "-c", script], env, timeout=60)
        if r.returncode == 0:
            nodes = [x for x in json.loads(r.stdout.strip().splitlines()[-1]) if x["state"] == "ALIVE"]
            if len(nodes) == n:
                return nodes
            last = nodes
        else:
            last = r.stderr[-2000:]
        time.sleep(2)
    raise AssertionError(f"cluster did not reach {n} nodes: {last}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ingest_pretrain_embed_serve_on_a_two_node_cluster(tmp_path):
    t_start = time.time()
    env = base_env()
    cli = str(BIN / "userfm")

    synth = run([cli, "synth", "--out", str(tmp_path / "synth"), "--users", "300"], env, timeout=180)
    assert synth.returncode == 0, synth.stderr[-3000:]

    # the cluster: own temp dirs (short: Unix socket paths <= 107 bytes), own token, distinct ports
    head_tmp = tempfile.mkdtemp(prefix="mnh", dir="/tmp")
    worker_tmp = tempfile.mkdtemp(prefix="mnw", dir="/tmp")
    token = Path(head_tmp) / "auth_token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    auth = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    node_env = {**auth, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # nothing to drain when the test stops a node
    gcs, dash_port, client = free_ports(3)
    address, dash = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash_port}"
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--object-store-memory", str(300 * 1024**2),
              "--disable-usage-stats"]
    logs = [tmp_path / "head.log", tmp_path / "worker.log"]
    head, head_f = start_node(["--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
                               "--ray-client-server-port", str(client), "--temp-dir", head_tmp, "--resources", '{"node_head": 1}',
                               *common, *node_ports()], node_env, logs[0])
    worker = worker_f = None
    served = None
    try:
        wait_nodes(auth, dash, 1, time.time() + 180, [head], logs[:1])
        worker, worker_f = start_node(["--address", address, "--temp-dir", worker_tmp, "--resources", '{"node_worker": 1}',
                                       *common, *node_ports()], node_env, logs[1])
        nodes = wait_nodes(auth, dash, 2, time.time() + 180, [head, worker], logs)
        assert sorted(k for x in nodes for k in x["resources"] if k.startswith("node_")) == ["node_head", "node_worker"]
        t_cluster = time.time()

        # the stages, each a CLI process joining the cluster with --address
        ds, run_dir, emb = tmp_path / "ds", tmp_path / "run", tmp_path / "emb"
        steps = {}

        def stage(name: str, args: list[str], timeout: float):
            t0 = time.time()
            r = run([cli, *args, "--address", address], auth, timeout=timeout)
            (tmp_path / f"{name}.log").write_text(r.stdout + r.stderr)
            assert r.returncode == 0, f"{name} failed:\n{(r.stdout + r.stderr)[-5000:]}"
            steps[name] = round(time.time() - t0, 1)
            return r

        stage("ingest", ["ingest", str(tmp_path / "synth" / "events"), "--out", str(ds),
                         "--attributes", str(tmp_path / "synth" / "attributes.parquet")], 300)
        config = tmp_path / "pretrain.yaml"
        config.write_text("size: tiny\nobjective: clue\nitem_encoder: category\nbatch_size: 8\nmax_steps: 4\n"
                          "num_workers: 2\ncpus_per_worker: 1.5\nlog_every: 2\ncheckpoint_every: 2\neval_every: 0\n")
        stage("pretrain", ["pretrain", "--config", str(config), "--data", str(ds), "--out", str(run_dir)], 420)
        stage("embed", ["embed", "--model", str(run_dir / "model"), "--data", str(ds), "--out", str(emb),
                        "--set", "cpus_per_actor=0.5"], 300)

        # where the two Train workers ran: one per node
        script = ("import json, ray.util.state as s; print(json.dumps([a.node_id for a in s.list_actors(address="
                  f"{dash!r}, filters=[('class_name', '=', 'RayTrainWorker')], detail=True, limit=1000)]))")
        r = run([PY, "-c", script], auth, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        worker_nodes = json.loads(r.stdout.strip().splitlines()[-1])
        assert len(worker_nodes) == 2 and set(worker_nodes) == {x["node_id"] for x in nodes}, (worker_nodes, nodes)

        # the exported model loads without Ray and reproduces the table embedded on the cluster
        import userfm
        from userfm.data.dataset import read_sequences
        from userfm.infer.embed import read_embeddings
        from userfm.models.features import make_batch, to_torch

        model, vocabs, tok = userfm.load_encoder(run_dir / "model")
        rows = read_sequences(ds)
        with torch.no_grad():
            ref = model(to_torch(make_batch(rows, vocabs, tok, max_events=model.config.max_events))).numpy()
        ids, x = read_embeddings(emb)
        assert len(ids) == rows.num_rows == json.loads((ds / "manifest.json").read_text())["users"]["total"]
        order = {u: i for i, u in enumerate(rows.column("user_id").to_pylist())}
        np.testing.assert_allclose(x, ref[[order[u] for u in ids]], rtol=1e-5, atol=1e-6)
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        assert max(m["step"] for m in metrics) == 4

        # serve on the cluster; a stored embedding comes back as written
        (port,) = free_ports(1)
        t0 = time.time()
        served = subprocess.Popen([cli, "serve", "--model", str(run_dir / "model"), "--embeddings", str(emb),
                                   "--port", str(port), "--address", address, "--set", "encoder_cpus=0.2",
                                   "--set", "store_cpus=0.1", "--set", "ingress_cpus=0.1"],
                                  env=auth, stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        deadline, health = time.time() + 240, None
        while time.time() < deadline and served.poll() is None:
            try:
                health = httpx.get(f"{base}/healthz", timeout=10)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert health is not None and health.status_code == 200, (tmp_path / "serve.log").read_text()[-5000:]
        assert health.json()["embeddings"]["users"] == len(ids)
        got = httpx.get(f"{base}/v1/users/{ids[3]}/embedding", timeout=30)
        assert got.status_code == 200
        np.testing.assert_allclose(got.json()["embedding"], x[3], rtol=1e-6)
        served.send_signal(signal.SIGINT)  # userfm serve shuts Serve down on Ctrl-C
        assert served.wait(timeout=120) == 130
        steps["serve"] = round(time.time() - t0, 1)
        print(f"\n[test_multinode] cluster up in {t_cluster - t_start:.0f}s; stages (s): {steps}; "
              f"total {time.time() - t_start:.0f}s")
    finally:
        if served is not None and served.poll() is None:
            served.kill()
        t_stop = time.time()
        fallback = []
        if worker is not None:
            fallback += stop_head(worker, worker_tmp)
            worker_f.close()
        fallback += stop_head(head, head_tmp)
        head_f.close()
        survivors = processes_of(head_tmp) + processes_of(worker_tmp)
        print(f"[test_multinode] nodes stopped in {time.time() - t_stop:.0f}s; killed by the fallback: {fallback}")
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(worker_tmp, ignore_errors=True)
    assert not survivors, f"processes of the test's cluster survived: {[p.pid for p in survivors]}"
