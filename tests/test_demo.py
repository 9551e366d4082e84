"""A shortened `dsv3ray demo`: real stdlib corpus → prepare (tokenizer training included) →
debug model, EP=2 on 2 Ray Train workers → report + plot; held-out loss below the unigram entropy."""

import argparse
import json

import pytest

from dsv3ray.demo import DEMO_CONFIG, cli_demo, demo_run

pytestmark = pytest.mark.slow

SHORT = [
    'data.inputs=["corpus:stdlib:300000"]',
    "prepare.seq_len=64",
    "prepare.vocab_size=512",
    "prepare.eval_fraction=0.1",
    "model.vocab_size=512",
    "train.steps=40",
    "train.log_every=10",
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "deepspeed.scheduler.params.warmup_num_steps=5",
    "deepspeed.scheduler.params.total_num_steps=40",
]


def test_demo_config_is_the_documented_setup():
    run = demo_run(argparse.Namespace(preset=None, config=None, overrides=[]))
    assert DEMO_CONFIG.is_file()
    assert (
        run.train.num_workers == 2 and run.train.ep_size == 2 and run.data.inputs == ["corpus:stdlib:2000000"]
    )
    assert run.model.hidden_size == 128  # the debug preset


def test_short_demo_beats_unigram_entropy(ray_local, tmp_path, capsys):
    args = argparse.Namespace(
        preset=None, config=None, overrides=SHORT + [f"train.run_dir={tmp_path / 'demo'}"]
    )
    assert cli_demo(None, args) == 0
    rep = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert rep["steps"] == 40 and rep["ep_size"] == 2 and rep["world_size"] == 2
    assert rep["final_eval_loss"] < rep["unigram_entropy"], rep
    assert (
        tmp_path / "demo" / "data" / "tokenizer.json"
    ).is_file()  # prepared (tokenizer trained) in the run
    out = capsys.readouterr().out
    assert "demo done" in out and str(tmp_path / "demo" / "report.md") in out


def test_distill_demo_trains_the_teacher_first_then_the_student(tmp_path, monkeypatch, capsys):
    """`dsv3ray demo --config configs/distill_demo.toml`: teacher run (dense, exported), then the
    MoE student distilled from it; a teacher that already exported is not trained again."""
    import dsv3ray.train

    monkeypatch.chdir(tmp_path)
    runs = []

    def fake_train(run):  # the boundary: each stage's training is tested on its own elsewhere
        runs.append(run)
        run_dir = tmp_path / run.train.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        if run.distill.save_as_teacher:
            (run_dir / "hf").mkdir()
            (run_dir / "hf" / "config.json").write_text("{}")
        report = {
            "final_eval_loss": 5.0,
            "unigram_entropy": 6.0,
            "beats_unigram": True,
            "loss_curve": "x.png",
        }
        (run_dir / "report.json").write_text(json.dumps(report))
        return {"run_dir": str(run_dir), "wall_s": 1.0, "report": str(run_dir / "report.md")}

    monkeypatch.setattr(dsv3ray.train, "train", fake_train)
    config = str(DEMO_CONFIG.parent / "distill_demo.toml")
    args = argparse.Namespace(config=config, preset=None, overrides=["train.steps=5"])
    assert cli_demo(None, args) == 0
    teacher, student = runs
    assert teacher.model.first_k_dense_replace == teacher.model.num_hidden_layers  # dense teacher
    assert teacher.train.ep_size == 1 and teacher.distill.teacher == "" and teacher.distill.save_as_teacher
    assert student.distill.teacher == "runs/distill-teacher" and student.model.first_k_dense_replace < 4
    assert teacher.train.steps == student.train.steps == 5  # the user's --set reaches both stages
    assert cli_demo(None, args) == 0 and len(runs) == 3  # teacher exported: only the student again
