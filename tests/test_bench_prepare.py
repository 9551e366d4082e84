"""benchmarks/prepare.py (the data pipeline benchmark) runs end to end on a small input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_prepare_benchmark_runs_and_reports(tmp_path):
    import tempfile

    scratch = Path(tempfile.gettempdir())
    before = set(scratch.glob("dsv3ray-bench-*"))
    # its own process: the benchmark starts and stops a local Ray of its own
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "prepare.py"), "--docs", "800", "--repeats", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(scratch.glob("dsv3ray-bench-*")) <= before  # its inputs and outputs are gone
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["docs"] == 800 and out["target"] == ">= 0.5" and out["corpus"] == "recombined"
    assert out["fasttext_docs_per_s"] > 0 and 0 < out["ratio"] < 5 and out["pipeline_docs_per_s_per_core"] > 0
    assert (
        out["fasttext_docs_per_s"] == max(out["fasttext_docs_per_s_before_after"])
        and out["cpu_us_per_doc"] > 0
    )
    assert out["fasttext_all_cores_docs_per_s_per_core"] > 0 and 0 < out["ratio_vs_fasttext_all_cores"] < 5
    assert set(out["wall_s"]) == {"200", "800"} and out["memory_growth"] > 0
    # each size ran twice; the fastest run counts
    assert out["repeats"] == 2 and all(len(w) == 2 for w in out["wall_s_runs"].values())
    assert all(out["wall_s"][n] == min(w) for n, w in out["wall_s_runs"].items())
    cpu = out["cpu_s"]  # sampled per process: the cleaning workers and the driver both worked
    assert set(cpu) == {"cleaning_workers", "driver", "ray_other", "available"}
    assert cpu["cleaning_workers"] > 0 and cpu["driver"] > 0 and cpu["available"] > 0
    assert out["warmup_s"] > 0
    drv = out["driver"]  # the driver's share: its thread within its process, the bound it sets
    assert 0 < drv["thread_us_per_doc"] <= drv["process_us_per_doc"]
    assert drv["docs_per_s_bound"]["process"] == round(800 / cpu["driver"])
    assert drv["docs_per_s_bound"]["thread"] >= drv["docs_per_s_bound"]["process"]
    assert set(out["us_per_doc_per_core"]) >= {
        "read",
        "normalize",
        "chunks",
        "quality",
        "dedup_keys",
        "tokenize",
    }


def test_docstring_corpus_is_real_unique_and_long_tailed():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from prepare import docstring_docs, make_docs
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    docs = docstring_docs(3000)
    assert len(docs) == 3000 and len(set(docs)) == 3000 and min(map(len, docs)) >= 200
    assert docstring_docs(50) == docs[:50]  # deterministic, in file order

    def distinct_chunks(texts):
        return len({c for t in texts for c in t.split(" ")}) / sum(len(t.split(" ")) for t in texts)

    # the point of the second corpus: many more new words per document than the recombined one
    assert distinct_chunks(docs) > 3 * distinct_chunks(make_docs(3000))
