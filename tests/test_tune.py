"""`dsv3ray tune`: config checks, routing overrides, objectives, Pareto front and outputs; a real
4-trial sweep of a tiny model on CPU (slow)."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from dsv3ray.config import section_from_dict
from dsv3ray.cost import CostConfig, RunningCost
from dsv3ray.errors import ConfigError
from dsv3ray.model import ModelConfig
from dsv3ray.tune import TuneConfig, pareto_front, routing_overrides, trial_metrics, write_outputs


@pytest.mark.parametrize(
    "data, key",
    [
        ({"num_samples": 0}, "tune.num_samples"),
        ({"keep_ratio": [0.5, 0.1]}, "tune.keep_ratio"),
        ({"keep_ratio": [0.0, 0.1]}, "tune.keep_ratio"),
        ({"n_routed_experts": []}, "tune.n_routed_experts"),
        ({"lr": [1e-3]}, "tune.lr"),
        ({"scheduler": "hyperband"}, "tune.scheduler"),
        ({"rungs": 0}, "tune.rungs"),
        ({"bogus": 1}, "tune.bogus"),
    ],
)
def test_tune_config_errors(data, key):
    with pytest.raises(ConfigError, match=key):
        section_from_dict(TuneConfig, data, "tune")


@pytest.mark.parametrize("n_experts", [2, 3, 4, 8, 16, 64])
@pytest.mark.parametrize("keep_ratio", [0.01, 0.125, 0.3, 0.5, 1.0])
def test_routing_overrides_always_give_a_valid_model(n_experts, keep_ratio):
    base = {"n_group": 4, "topk_group": 2}
    over = routing_overrides(base, n_experts, keep_ratio)
    cfg = ModelConfig.from_preset("debug", **over)  # raises ConfigError if invalid
    assert cfg.num_experts_per_tok == max(1, round(keep_ratio * n_experts))
    if n_experts == 16 and keep_ratio <= 0.5:  # the debug grouping still fits: kept
        assert (cfg.n_group, cfg.topk_group) == (4, 2)


def _row(i, loss, cost, **kw):
    return {
        "trial_id": f"t{i}",
        "eval_loss": loss,
        "cost": cost,
        "keep_ratio": 0.1 * i,
        "n_routed_experts": 8,
        "num_experts_per_tok": 1,
        "status": "TERMINATED",
        **kw,
    }


def test_pareto_front_and_outputs(tmp_path):
    rows = [
        _row(1, 3.0, 1.0),
        _row(2, 2.0, 2.0),
        _row(3, 2.5, 2.5),  # dominated by t2
        _row(4, 1.5, 4.0),
        _row(5, 1.5, 5.0),  # dominated by t4
        _row(6, math.nan, math.nan, status="ERROR", error="boom"),
        _row(7, 2.9, 0.5, stopped_early=True),  # cheaper only because it trained less
    ]
    front = pareto_front(rows)
    assert [r["trial_id"] for r in front] == ["t1", "t2", "t4"]
    paths = write_outputs(rows, tmp_path)
    with paths["trials"].open() as f:
        trials = list(csv.DictReader(f))
    with paths["pareto"].open() as f:
        pareto = list(csv.DictReader(f))
    assert len(trials) == 7 and [r["trial_id"] for r in pareto] == ["t1", "t2", "t4"]
    assert {r["trial_id"]: r["status"] for r in trials}["t6"] == "ERROR"
    assert paths["png"].stat().st_size > 1000


class _Run:
    """Just the sections trial_metrics reads (a boundary: the resolved run config)."""

    def __init__(self):
        from dsv3ray.train import TrainConfig

        self.model = ModelConfig.from_preset("debug")
        self.train = TrainConfig(num_workers=2, dtype="fp32")
        self.cost = CostConfig()


def test_trial_metrics_cost_is_measured_training_time():
    run = _Run()
    summaries = [
        {"tokens": 4096, "steps": 4, "tokens_per_s": 1024.0, "final_eval_loss": 6.0, "activation_ratio": 0.6},
        # the second stage resumed at step 4: cumulative 8192 tokens, its own 4096
        {"tokens": 8192, "steps": 8, "resumed_from_step": 4, "tokens_per_s": 2048.0, "final_eval_loss": 5.0},
    ]
    m = trial_metrics(run, summaries, seq_len=64)
    assert m["train_s"] == pytest.approx(4.0 + 2.0) and m["tokens"] == 8192 and m["stages"] == 2
    assert m["eval_loss"] == 5.0
    expect = RunningCost("CPU", 2, run.cost).at(6.0)
    assert m["cost"] == pytest.approx(expect["total_cost"]) and m["gpu_hours"] == pytest.approx(2 * 6 / 3600)
    assert 0 < m["mfu"] < 1


# ---------------------------------------------------------------------------------------------
# The real sweep
# ---------------------------------------------------------------------------------------------


def _prepared_dir(
    root: Path, seq_len: int = 32, vocab: int = 256, n_train: int = 64, n_eval: int = 8
) -> Path:
    """A prepared directory by the data contract: learnable rows (arithmetic token sequences)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, models

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("eval", n_eval)):
        (root / split).mkdir(exist_ok=True)
        start = rng.integers(0, vocab, n)
        step = rng.integers(1, 4, n)
        rows = [
            ((s + k * np.arange(seq_len + 1)) % vocab).astype(np.int32).tolist() for s, k in zip(start, step)
        ]
        table = pa.table(
            {
                "sample_id": pa.array(np.arange(n), pa.int64()),
                "input_ids": pa.array(rows, pa.list_(pa.int32())),
            }
        )
        pq.write_table(table, root / split / "part-00000.parquet")
    Tokenizer(models.BPE()).save(str(root / "tokenizer.json"))
    meta = {
        "seq_len": seq_len,
        "vocab_size": vocab,
        "num_train": n_train,
        "num_eval": n_eval,
        "tokenizer": "tokenizer.json",
        "unigram_entropy": math.log(vocab),
        "eos_id": 0,
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.mark.slow
def test_four_trial_sweep_on_cpu(tmp_path, ray_local):
    pytest.importorskip("pipelines.dataset")  # the training entry point's data reader
    from dsv3ray.runconfig import resolve_run_config
    from dsv3ray.train import train
    from dsv3ray.tune import sweep

    prepared = _prepared_dir(tmp_path / "data")
    overrides = [
        f"data.prepared={json.dumps(str(prepared))}",
        "model.vocab_size=256",
        "model.hidden_size=32",
        "model.num_hidden_layers=2",
        "model.num_attention_heads=2",
        "model.intermediate_size=64",
        "model.moe_intermediate_size=16",
        "model.max_position_embeddings=64",
        "train.num_workers=1",
        "train.micro_batch_size=4",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.checkpoint_every=0",
        "train.log_every=100",
        "tune.num_samples=4",
        "tune.n_routed_experts=[4, 8]",
        "tune.keep_ratio=[0.2, 0.6]",
        "tune.tokens=1024",
        "tune.rungs=2",  # ASHA sees an intermediate result; each rung is one short resumed run
        "tune.lr=[3e-3, 3e-2]",
        "tune.max_concurrent=1",
    ]
    run = resolve_run_config(overrides=overrides)

    marker = tmp_path / "failed-once"

    def train_or_fail(trial_run):
        # the first trial to start fails (a boundary fault): the sweep must record it and go on
        if not marker.exists():
            marker.write_text("x")
            raise RuntimeError("injected trial failure")
        return train(trial_run)

    out = tmp_path / "sweep"
    res = sweep(run, str(out), train_fn=train_or_fail)
    rows = res["rows"]
    assert len(rows) == 4
    with (out / "trials.csv").open() as f:
        trials = list(csv.DictReader(f))
    with (out / "pareto.csv").open() as f:
        pareto = list(csv.DictReader(f))
    assert len(trials) == 4 and (out / "pareto.png").is_file()
    done = [r for r in rows if r["status"] == "TERMINATED"]
    assert done, rows
    from dsv3ray.cost import RunningCost

    for r in done:
        assert math.isfinite(r["eval_loss"]) and r["eval_loss"] < math.log(256) and r["cost"] > 0
        assert Path(r["run_dir"]).is_dir()
        # the cost is the cost model's price of the measured throughput (1 CPU worker)
        spend = RunningCost("CPU", 1, run.cost).at(r["tokens"] / r["tokens_per_s"])
        assert r["cost"] == pytest.approx(spend["total_cost"], rel=1e-6)
        assert r["gpu_hours"] == pytest.approx(spend["gpu_hours"], rel=1e-6)
        assert r["energy_kwh"] == pytest.approx(spend["energy_kwh"], rel=1e-6)
    failed = [r for r in rows if r["status"] == "ERROR"]
    assert len(failed) == 1 and failed[0]["error"] == "RuntimeError: injected trial failure"
    assert failed[0]["keep_ratio"] is not None and failed[0]["n_routed_experts"] in (4, 8)
    # the front is the non-dominated subset of the finished trials
    ids = {r["trial_id"] for r in pareto}
    assert ids and ids <= {r["trial_id"] for r in done}
    assert ids == {r["trial_id"] for r in pareto_front(done)}
    # re-running on the same output resumes (nothing left to run) and keeps the trials
    again = sweep(run, str(out), train_fn=train_or_fail)
    assert {r["trial_id"] for r in again["rows"]} == {r["trial_id"] for r in rows}


def test_trial_error_is_its_innermost_cause_on_one_line():
    from ray.exceptions import RayTaskError

    from dsv3ray.tune import _one_line

    try:
        raise RuntimeError("injected trial failure")
    except RuntimeError as e:
        wrapped = RayTaskError("trainable", "Traceback (most recent call last):\n  ...", e)
    assert _one_line(wrapped) == "RuntimeError: injected trial failure"
