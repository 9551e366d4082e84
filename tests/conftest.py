"""Shared fixtures. Tests run on CPU; `gpu` tests skip without CUDA; Ray tests share one small local Ray."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray for the whole session (2 CPUs), always shut down."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
    yield ray
    ray.shutdown()


@pytest.fixture
def worker_lines(ray_local):
    """worker_lines(text): lines holding `text` in this Ray session's worker stdout/stderr files."""

    def count(text: str) -> int:
        logs = Path(ray_local._private.worker._global_node.get_logs_dir_path())
        files = [*logs.glob("worker-*.out"), *logs.glob("worker-*.err")]
        return sum(f.read_text(errors="replace").count(text) for f in files)

    return count


@pytest.fixture
def exact_fp32():
    """Exact fp32 matmuls (no reduced-precision paths), one thread (tiny shapes, shared CPU), seed 0."""
    prev, threads = torch.get_float32_matmul_precision(), torch.get_num_threads()
    torch.set_float32_matmul_precision("highest")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_float32_matmul_precision(prev)
    torch.set_num_threads(threads)
