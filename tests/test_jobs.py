"""`ray job submit` of `userfm pretrain` to a `ray start --head` cluster with token auth on (slow).

The test starts its own head (free ports, its own short --temp-dir, its own token file), submits a
tiny pretraining job with the `ray job` CLI, checks the exported model, and stops only that cluster:
`ray stop` would end every Ray process of the user on the host (other tests' embedded Ray included),
so the head runs as `ray start --head --block`, whose SIGTERM handler shuts down exactly the
processes of that node; anything left whose command line names the test's temp dir is killed after.

Client side: what a user runs (the README copies this)
-------------------------------------------------------
Token auth (Ray 2.60), as measured here: `ray start --head` turns it on when a token exists
(`~/.ray/auth_token`, `RAY_AUTH_TOKEN_PATH` or `RAY_AUTH_TOKEN`) or `RAY_AUTH_MODE=token` is set.
With neither it does NOT create a token: it starts with auth off and only logs a warning. So on
the head node::

    ray get-auth-token --generate                  # once: writes ~/.ray/auth_token if there is none
    RAY_AUTH_MODE=token ray start --head --num-cpus 2 --dashboard-port 8265
                                                   # RAY_AUTH_MODE=token: refuse to start without a token
    ray get-auth-token                             # prints the token, to hand to job submitters

On the client, the `ray job` CLI needs RAY_AUTH_MODE=token even when it has the token (without it:
"Token authentication is enabled but no authentication token was found ... RAY_AUTH_MODE is
currently 'disabled'"; the dashboard answers 401 to requests without the token)::

    export RAY_AUTH_MODE=token
    # and the token, one of: the file ~/.ray/auth_token (default),
    export RAY_AUTH_TOKEN_PATH=/path/to/auth_token   # or: export RAY_AUTH_TOKEN=<token>
    ray job submit --address http://<head>:8265 --working-dir . \\
        --runtime-env-json '{"excludes": [".venv", "runs", ".git"]}' \\
        -- userfm pretrain --config <repo-relative.yaml> --data /shared/data --out /shared/runs/p1

- `--address` is the dashboard's HTTP address (port 8265 by default), not the GCS port (6379);
  `RAY_API_SERVER_ADDRESS=http://<head>:8265` in the environment does the same.
- `ray job submit` waits for the job, streams its logs and exits 1 if the job fails (`--no-wait`
  returns at once; then `ray job status|logs|stop <id>` with the same env and --address).
- The entrypoint runs on the head with the cluster's Python: `userfm` must be installed in the
  environment `ray start` was run from (`pip install -c constraints.txt -e .`). The working dir is
  uploaded (500 MB limit; `.gitignore` and the `excludes` above keep the venv, runs and .git out)
  and becomes the job's cwd, so repo-relative `--config` paths resolve; `--data` / `--out` are paths
  on the cluster's machines (shared storage on a multi-node cluster). The job's driver finds the
  cluster through RAY_ADDRESS, which Ray sets for it.
- Stop a head with `ray stop` on that machine (it stops every Ray process of the user there).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: ray, userfm


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (held open together while picking, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no inherited RAY_ADDRESS etc.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def run(cmd: list[str], env: dict, timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def _psutil():
    import ray  # noqa: F401  (puts Ray's bundled psutil on sys.path)
    import psutil

    return psutil


def processes_of(temp_dir: str):
    """Processes whose command line names temp_dir (this head's raylet, GCS, dashboard, workers...)."""
    psutil = _psutil()

    me = os.getpid()
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.info["pid"] != me and any(temp_dir in a for a in (p.info["cmdline"] or [])):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def stop_head(head: subprocess.Popen, temp_dir: str) -> list[int]:
    """Stop only this head: SIGTERM its `ray start --block` (which kills its node's processes), then
    kill whatever still names temp_dir, with its children. Returns the pids that needed the fallback."""
    psutil = _psutil()

    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=10)
    left = processes_of(temp_dir)
    for p in list(left):
        try:
            left.extend(p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for p in left:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(left, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in left]


def wait_for_job_api(url: str, env: dict, deadline: float, head: subprocess.Popen, head_log: Path) -> None:
    """Until `ray job list` answers (the dashboard's job module is up); fails fast if the head exits."""
    last = None
    while time.time() < deadline:
        if head.poll() is not None:
            raise AssertionError(f"ray start exited with {head.returncode}:\n{head_log.read_text()[-5000:]}")
        last = run([str(BIN / "ray"), "job", "list", "--address", url], env, timeout=60)
        if last.returncode == 0:
            return
        time.sleep(2)
    raise AssertionError(f"job API at {url} not ready:\n{last.stdout}\n{last.stderr}" if last else url)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_job_submit_pretrain_with_token_auth(tmp_path):
    t_start = time.time()
    env = base_env()

    # 1. a tiny dataset, each step in its own process (embedded Ray, gone when the command exits)
    synth = run([str(BIN / "userfm"), "synth", "--out", str(tmp_path / "synth"), "--users", "300"], env, timeout=180)
    assert synth.returncode == 0, synth.stderr[-3000:]
    ingest = run([str(BIN / "userfm"), "ingest", str(tmp_path / "synth" / "events"), "--out", str(tmp_path / "data"),
                  "--num-cpus", "2"], env, timeout=300)
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    config = tmp_path / "pretrain.yaml"
    config.write_text("size: tiny\nobjective: clue\nitem_encoder: category\nbatch_size: 8\nmax_steps: 4\n")

    # 2. our own head: free ports, a short temp dir (Unix socket paths <= 107 bytes), token auth on with
    #    a token file of this test (the user's ~/.ray/auth_token is neither read nor written)
    temp_dir = tempfile.mkdtemp(prefix="rjob", dir="/tmp")
    token_file = Path(temp_dir) / "auth_token"
    token_file.write_text(os.urandom(32).hex())
    token_file.chmod(0o600)
    auth_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    # SIGTERM to `ray start --block` would first drain the node for 30 s (for Serve); nothing to drain here
    head_env = {**auth_env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    gcs, dash, client, agent_http, agent_grpc, rt_env, metrics, node_mgr, obj_mgr = free_ports(9)
    url = f"http://127.0.0.1:{dash}"
    head_log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--port", str(gcs), "--dashboard-port", str(dash),
         "--dashboard-host", "127.0.0.1", "--ray-client-server-port", str(client),
         "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--runtime-env-agent-port", str(rt_env), "--metrics-export-port", str(metrics),
         "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
         "--num-cpus", "2", "--temp-dir", temp_dir, "--disable-usage-stats"],
        env=head_env, stdout=head_log, stderr=subprocess.STDOUT,
        start_new_session=True,  # pytest's Ctrl-C does not reach it; we stop it ourselves
    )
    try:
        wait_for_job_api(url, auth_env, time.time() + 120, head, tmp_path / "head.log")
        t_ready = time.time()

        # token auth is really on: no token -> 401 from the dashboard; the CLI without RAY_AUTH_MODE fails
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(f"{url}/api/jobs/", timeout=10)
        assert exc.value.code == 401
        denied = run([str(BIN / "ray"), "job", "list", "--address", url], env, timeout=60)
        assert denied.returncode != 0 and "token" in denied.stderr.lower(), denied.stderr[-2000:]

        # 3. submit and wait (the CLI streams the job's logs and exits 1 if the job fails)
        out = tmp_path / "run"
        submit = run(
            [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(REPO),
             "--runtime-env-json", json.dumps({"excludes": [".venv", "runs", ".git"]}), "--",
             "userfm", "pretrain", "--config", str(config), "--data", str(tmp_path / "data"), "--out", str(out),
             "--set", "num_workers=1", "--set", "log_every=2", "--set", "checkpoint_every=2",
             "--set", "eval_every=0"],
            auth_env, timeout=420,
        )
        log = submit.stdout + submit.stderr
        (tmp_path / "submit.log").write_text(log)
        assert submit.returncode == 0, log[-5000:]
        assert "succeeded" in log.lower(), log[-5000:]
        t_job = time.time()

        # 4. the exported model loads
        assert (out / "model" / "config.json").is_file()
        assert (out / "model" / "model.safetensors").is_file()
        from userfm import load_encoder

        model, vocabs, _tok = load_encoder(out / "model")
        assert model.config.d_model == 32 and vocabs is not None
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        assert max(r["step"] for r in rows) == 4
        print(f"\n[test_jobs] head ready {t_ready - t_start:.0f}s after start of test, job {t_job - t_ready:.0f}s")
    finally:
        t_stop = time.time()
        fallback = stop_head(head, temp_dir)
        head_log.close()
        survivors = processes_of(temp_dir)
        print(f"[test_jobs] head stopped in {time.time() - t_stop:.0f}s; killed by the fallback: {fallback}")
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not survivors, f"processes of the test's head survived: {[p.pid for p in survivors]}"
