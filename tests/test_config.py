"""Config machinery: overrides, precedence, TOML round trip, errors that cross process boundaries."""

import pickle
import tomllib

import pytest

from dsv3ray.config import apply_overrides, parse_value
from dsv3ray.errors import ConfigError, UserError
from dsv3ray.runconfig import dump_toml, resolve_run_config


def test_set_values_are_toml_literals():
    assert parse_value("1e-4") == 1e-4
    assert parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("debug") == "debug"
    out = apply_overrides({"model": {"a": 1}}, ["model.b=2", "deepspeed.zero_optimization.stage=2"])
    assert out == {"model": {"a": 1, "b": 2}, "deepspeed": {"zero_optimization": {"stage": 2}}}


def test_precedence_preset_then_file_then_set(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[model]\npreset = "debug"\nhidden_size = 96\nkeep_ratio = 0.25\n[train]\nsteps = 7\n')
    run = resolve_run_config(preset="debug", config=str(cfg), overrides=["model.keep_ratio=0.5"])
    assert run.model.hidden_size == 96  # file over preset
    assert run.model.num_experts_per_tok == round(0.5 * run.model.n_routed_experts)  # --set over file
    assert run.train.steps == 7


def test_resolved_config_round_trips_through_toml(tmp_path):
    run = resolve_run_config(preset="debug", overrides=["deepspeed.zero_optimization.stage=1"])
    text = dump_toml(run.to_dict())
    again = tomllib.loads(text)
    assert again["model"]["hidden_size"] == run.model.hidden_size
    assert again["deepspeed"]["zero_optimization"]["stage"] == 1
    path = tmp_path / "resolved.toml"
    path.write_text(text)
    rerun = resolve_run_config(config=str(path))
    assert rerun.to_dict()["model"] == run.to_dict()["model"]


def test_errors_survive_pickling():
    e = pickle.loads(pickle.dumps(ConfigError("model.keep_ratio", 2.0, "a number in (0, 1]")))
    assert isinstance(e, UserError) and e.key == "model.keep_ratio" and "(0, 1]" in str(e)


def test_ep_size_must_divide_experts():
    with pytest.raises(ConfigError, match="train.ep_size"):
        resolve_run_config(preset="debug", overrides=["train.num_workers=6", "train.ep_size=6"])


def test_prepared_dir_is_made_absolute(tmp_path, monkeypatch):
    """Relative data.prepared works from trials/workers whose working directory differs (Ray Tune)."""
    from dsv3ray.data import check_prepared, write_synthetic_prepared

    write_synthetic_prepared(tmp_path / "d", num_train=16, num_eval=4, seq_len=8, vocab_size=32)
    monkeypatch.chdir(tmp_path)
    data = check_prepared("d")
    assert data.dir.is_absolute() and data.dir == (tmp_path / "d").resolve()
