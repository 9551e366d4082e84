"""Expert-load statistics, TensorBoard round trip, and the report files."""

import json

import torch

from dsv3ray.metrics import MetricsWriter, expert_load_stats, read_scalars
from dsv3ray.report import write_report


def test_expert_load_stats():
    load_LE = torch.tensor([[2.0, 2.0, 2.0, 2.0], [8.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    s = expert_load_stats(load_LE)
    assert s["moe/layer0/max_over_mean"] == 1.0 and s["moe/layer0/cv"] == 0.0
    assert s["moe/layer1/max_over_mean"] == 4.0 and abs(s["moe/layer1/cv"] - 3**0.5) < 1e-6
    assert s["moe/layer2/max_over_mean"] == 1.0  # no tokens: counted as balanced
    assert abs(s["moe/load_max_over_mean"] - 2.0) < 1e-6


def test_tensorboard_roundtrip_and_report(tmp_path):
    w = MetricsWriter(tmp_path / "tb")
    for step in range(1, 6):
        w.scalars({"train/ce_loss": 5.0 - step * 0.5, "train/lr": 1e-3, "bad": float("nan")}, step)
    w.scalars({"eval/loss": 3.0}, 5)
    w.close()
    MetricsWriter(None).scalars({"x": 1.0}, 1)  # non-zero ranks: no-op
    sc = read_scalars(tmp_path / "tb")
    assert [s for s, _ in sc["train/ce_loss"]] == [1, 2, 3, 4, 5]
    assert sc["train/ce_loss"][-1][1] == 2.5 and "bad" not in sc
    paths = write_report(
        tmp_path,
        {"name": "t", "steps": 5, "final_eval_loss": 3.0, "tensorboard_dir": str(tmp_path / "tb")},
        {"train": {"steps": 5}},
        {"unigram_entropy": 4.0},
    )
    rep = json.loads(paths["json"].read_text())
    assert rep["beats_unigram"] is True and rep["unigram_entropy"] == 4.0
    assert paths["png"].stat().st_size > 1000
    assert "beats" in paths["md"].read_text()
