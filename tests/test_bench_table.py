"""benchmarks/data_table.py (the training table in memory vs on disk) runs end to end on a small table."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(200)
def test_table_benchmark_runs_and_reports():
    scratch = Path(tempfile.gettempdir())
    before = set(scratch.glob("dsv3ray-bench-*"))
    # its own process: the benchmark starts and stops a local Ray of its own
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "data_table.py"), "--rows", "2000", "--seq-len", "255",
         "--workers", "2", "--batches", "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(scratch.glob("dsv3ray-bench-*")) <= before  # its data and tables are gone
    memory, disk, ratios = (json.loads(line) for line in proc.stdout.strip().splitlines()[-3:])
    assert (memory["mode"], disk["mode"]) == ("memory", "disk")
    assert memory["table_mb"] == pytest.approx(2000 * 256 * 2 / 2**20, abs=0.05)
    for line in (memory, disk):
        assert len(line["per_worker"]) == 2
        assert all(w["ready_s"] >= 0 and w["us_per_batch"] > 0 for w in line["per_worker"])
    assert ratios["baseline"] == "memory" and ratios["anon_memory_ratio"] > 0
