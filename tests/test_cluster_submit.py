"""Jobs take their cluster from the submitter: a Ray head on loopback + `ray job submit` of the training job."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from causalrec.schemas import TRAINING_EXAMPLES

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    temp = tempfile.mkdtemp(prefix="/tmp/crh")  # short: Ray's socket paths have a length limit
    port, dash = _free_port(), _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    # Every fixed default port gets a free one: a local Ray already running in this process (other
    # tests) holds the defaults, and a dashboard agent that cannot bind leaves the head without a job agent.
    ports = {flag: _free_port() for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                             "--runtime-env-agent-port", "--metrics-export-port",
                                             "--ray-client-server-port")}
    start = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         *[f"{flag}={p}" for flag, p in ports.items()],
         "--num-cpus=2", f"--temp-dir={temp}", "--disable-usage-stats"],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _stop_head(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _stop_head(temp: str) -> None:
    """Kill only this head's processes: those whose command line names its temp dir (Linux /proc).

    ``ray stop`` would kill every Ray process of the user, including the local Ray other tests
    (or another test run on the same machine) are using.
    """
    def pids() -> list[int]:
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    if temp.encode() in (d / "cmdline").read_bytes():
                        out.append(int(d.name))
                except OSError:
                    continue
        return out

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 20
        while pids() and time.time() < deadline:
            time.sleep(0.5)


def _training_examples(path: str) -> None:
    from test_train import synthetic_examples

    df = synthetic_examples(n_users=20, n_items=30, n_train=200, n_valid=60)
    table = pa.Table.from_pandas(df[TRAINING_EXAMPLES.names], schema=TRAINING_EXAMPLES.arrow_schema(),
                                 preserve_index=False)
    for part in range(2):  # two files per split: one shard per worker
        write_deltalake(path, table.slice(part * len(df) // 2, len(df) // 2), partition_by=["split"],
                        mode="append")


def test_ray_job_submit_runs_the_training_job_on_the_submitters_cluster(ray_head, tmp_path):
    dashboard, env = ray_head
    root = tmp_path / "tables"
    _training_examples(str(root / "training_examples"))
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        f"storage:\n  root: {root}\n"
        "train:\n  model: mf\n  objective: ips\n  epochs: 2\n  num_workers: 2\n  cpus_per_worker: 0.5\n"
        "  batch_size: 64\n  embedding_dim: 8\n  max_failures: 0\n"
        "training_set:\n  files_per_split: 2\n"
    )
    for _ in range(40):  # the head's job agent takes a little while to come up after `ray start`
        res = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--",
             sys.executable, str(REPO / "jobs" / "train.py"), "--config", str(cfg)],
            capture_output=True, text=True, timeout=900, env=env, cwd=str(REPO),
        )
        out = res.stdout + res.stderr
        if "No available agent" not in out:
            break
        time.sleep(3)
    assert res.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower(), out[-4000:]
    # the job joined the submitted cluster (not a fresh local Ray) and wrote its run record
    assert "connecting to cluster" in out or "Connected to Ray cluster" in out or "existing Ray cluster" in out.lower(), out[-4000:]
    runs = DeltaTable(str(root / "train_runs")).to_pyarrow_table().to_pylist()
    assert len(runs) == 1 and runs[0]["model"] == "mf"
    assert os.path.exists(runs[0]["checkpoint_path"])
