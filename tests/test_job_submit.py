"""`ray job submit --working-dir . -- dsv3ray train ...` (then `dsv3ray tune ...`) against a real
head on loopback.

The head runs `ray start --head --block` in its own session, so the finally kills exactly the
processes this test started (never `ray stop`, which would stop every Ray on the machine).
Ray 2.60 heads use token auth; `ray job submit` needs RAY_AUTH_MODE=token to send the token.
"""

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv3ray.data import write_synthetic_prepared

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


JOB_TOML = """
[model]
preset = "debug"
vocab_size = 128
num_hidden_layers = 2
max_position_embeddings = 64
moe_impl = "torch"
[train]
num_workers = 1
ep_size = 1
steps = 2
micro_batch_size = 2
eval_batches = 1
checkpoint_every = 0
activation_checkpointing = true
run_dir = "{run}"
[data]
prepared = "{data}"
"""


TUNE_TOML = """
[tune]
num_samples = 1
n_routed_experts = [4, 8]
keep_ratio = [0.25, 0.5]
tokens = 128
rungs = 1
max_concurrent = 1
"""


def test_ray_job_submit_trains_and_tunes_on_a_cluster(tmp_path):
    data = write_synthetic_prepared(tmp_path / "data", num_train=32, num_eval=4, seq_len=16, vocab_size=128)
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "job.toml").write_text(JOB_TOML.format(run=tmp_path / "run", data=data))
    (wd / "tune.toml").write_text(JOB_TOML.format(run=tmp_path / "trials", data=data) + TUNE_TOML)
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "RAY_AUTH_MODE": "token",
    }
    env.pop("RAY_ADDRESS", None)
    dash, agent, gcs = _free_port(), _free_port(), _free_port()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats",
         # every port explicit and free: other Ray clusters may run on this machine
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
         f"--ray-client-server-port={_free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        t0 = time.monotonic()
        # The head accepts jobs once its dashboard agent listens (cheap to poll, unlike the CLI).
        while not _listening(agent) and time.monotonic() - t0 < 60:
            time.sleep(0.5)
        t_agent = time.monotonic() - t0

        def submit(*command: str) -> str:
            for _ in range(3):  # the agent may listen a moment before it registers with the head
                r = subprocess.run(
                    [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                     "--working-dir", ".", "--", *command],
                    cwd=wd, env=env, capture_output=True, text=True, timeout=300,
                )  # fmt: skip
                out = r.stdout + r.stderr
                if "No available agent" not in out:
                    break
                time.sleep(3)
            assert r.returncode == 0 and "succeeded" in out, out[-3000:]
            return out

        out = submit("dsv3ray", "train", "--config", "job.toml")
        print(f"agent up after {t_agent:.0f}s, train job done after {time.monotonic() - t0:.0f}s")
        assert "[dsv3ray] done: 2 steps" in out
        assert (tmp_path / "run" / "report.json").is_file()
        # a sweep as a job: its trials run on the same cluster, the outputs land where it was told
        submit("dsv3ray", "tune", "--config", "tune.toml", "--output", str(tmp_path / "sweep"))
        print(f"tune job done after {time.monotonic() - t0:.0f}s")
        with (tmp_path / "sweep" / "trials.csv").open() as f:
            trials = list(csv.DictReader(f))
        assert len(trials) == 1 and all(t["status"] == "TERMINATED" for t in trials), trials
        assert (tmp_path / "sweep" / "pareto.png").is_file()
    finally:
        _kill_group(head)
        _forget_cluster(gcs)


def _forget_cluster(gcs_port: int) -> None:
    """`ray start` records its address in /tmp/ray/ray_current_cluster and only `ray stop` removes it:
    after the kill, a plain `ray.init()` on this machine would try to join the dead head."""
    record = Path("/tmp/ray/ray_current_cluster")
    try:
        if record.read_text().strip().endswith(f":{gcs_port}"):
            record.unlink()
    except OSError:
        pass


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0 or _listening_any(port)


def _listening_any(port: int) -> bool:
    # the agent binds the node's primary address, not always loopback
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((socket.gethostbyname(socket.gethostname()), port)) == 0


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the head's process group, SIGKILL what is left after 10 s (Ray's children stay in it)."""
    os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        proc.poll()
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
