"""The training workers' id -> tokens table in memory vs on disk (`data.table`); prints JSON lines.

    .venv/bin/python benchmarks/data_table.py [--rows 100000] [--seq-len 1023] [--workers 4] [--batches 200]

A synthetic prepared directory (rows x (seq_len + 1) uint16 ids) is read once with Ray Data
(materialized, as `dsv3ray train` does); then `--workers` Ray actors on this node each build the
train table as a training worker does (`dsv3ray.data.load_table`, local ranks 0..W-1) and draw
`--batches` random batches of 32 rows (`table[ids].astype(int64)`, what a step takes). One line per
mode with, per worker: seconds to have the table, peak anonymous memory (RssAnon: what cannot be
evicted; a mapped file's pages are page cache, shared by the node's workers) and µs per batch;
then a line with the ratios disk / memory (the baseline).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class TableWorker:
    """One training worker's data setup, measured."""

    def run(self, iterator, spec, local_rank: int, batches: int, seed: int) -> dict:
        from dsv3ray.data import load_table

        base = _rss_anon_mb()
        peak = [base]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_anon_mb())
                time.sleep(0.005)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        t0 = time.perf_counter()
        table = load_table(iterator, spec, local_rank, log=lambda _: None)
        ready = time.perf_counter() - t0
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        for _ in range(batches):
            table[rng.integers(0, len(table), 32)].astype(np.int64)
        per_batch = (time.perf_counter() - t0) / batches
        stop.set()
        t.join()
        return {
            "ready_s": round(ready, 3),
            "peak_anon_mb": round(peak[0] - base, 1),
            "us_per_batch": round(per_batch * 1e6, 1),
        }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--seq-len", type=int, default=1023)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batches", type=int, default=200)
    args = ap.parse_args(argv)

    import ray

    from dsv3ray.data import DataConfig, check_prepared, release_table, table_spec, write_synthetic_prepared
    from pipelines.dataset import read_prepared

    tmp = Path(tempfile.mkdtemp(prefix="dsv3ray-bench-table-"))
    try:
        data = check_prepared(
            write_synthetic_prepared(tmp / "data", args.rows, 8, args.seq_len, vocab_size=4096)
        )
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
        ds = read_prepared(data.dir, "train", files=data.train_files).materialize()
        worker = ray.remote(num_cpus=0)(TableWorker)
        lines = {}
        for mode in ("memory", "disk"):
            cfg = DataConfig(prepared=str(data.dir), table=mode, table_dir=str(tmp / "tables"))
            spec = table_spec(cfg, data, "train", args.seq_len + 1)
            actors = [worker.remote() for _ in range(args.workers)]
            t0 = time.perf_counter()
            per = ray.get(
                [a.run.remote(ds.iterator(), spec, i, args.batches, i) for i, a in enumerate(actors)]
            )
            wall = time.perf_counter() - t0
            lines[mode] = {
                "mode": mode,
                "rows": args.rows,
                "table_mb": round(spec.nbytes / 2**20, 1),
                "workers": args.workers,
                "all_ready_s": round(wall, 2),
                "peak_anon_mb_sum": round(sum(p["peak_anon_mb"] for p in per), 1),
                "per_worker": per,
            }
            print(json.dumps(lines[mode]), flush=True)
            for a in actors:
                ray.kill(a)
            release_table(spec)  # (the table goes once the writer's process is gone)
        ray.shutdown()
        m, d = lines["memory"], lines["disk"]
        batch = [np.median([p["us_per_batch"] for p in x["per_worker"]]) for x in (m, d)]
        print(
            json.dumps(
                {
                    "baseline": "memory",
                    "anon_memory_ratio": round(d["peak_anon_mb_sum"] / m["peak_anon_mb_sum"], 3),
                    "ready_ratio": round(d["all_ready_s"] / m["all_ready_s"], 3),
                    "batch_time_ratio": round(batch[1] / batch[0], 3),
                }
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
