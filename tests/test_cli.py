"""Every user-facing command, run wrong, gives one line and exit code 2 (no traceback)."""

import pytest

from dsv3ray.cli import build_parser, main


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "bad.toml").write_text("[model\nkeep_ratio = ")
    (tmp_path / "badsection.toml").write_text("[bogus]\nx = 1\n")
    (tmp_path / "scalar.toml").write_text("model = 3\n")
    (tmp_path / "adir").mkdir()
    return tmp_path


CASES = [
    # (argv, text the one line must contain)
    (["config", "--preset", "nope"], "nope"),
    (["config", "--config", "{d}/missing.toml"], "missing.toml"),
    (["config", "--config", "{d}/bad.toml"], "not valid TOML"),
    (["config", "--config", "{d}/adir"], "adir"),
    (["config", "--config", "{d}/badsection.toml"], "bogus"),
    (["config", "--config", "{d}/scalar.toml"], "model"),
    (["config", "--preset", "debug", "--set", "model.keep_ratio=0"], "model.keep_ratio"),
    (["config", "--preset", "debug", "--set", "model.keep_ratio=1.5"], "model.keep_ratio"),
    (["config", "--preset", "debug", "--set", "model.num_experts_per_tok=999"], "num_experts_per_tok"),
    (["config", "--preset", "debug", "--set", "model.n_group=3"], "model.n_group"),
    (["config", "--preset", "debug", "--set", "model.bogus_key=1"], "model.bogus_key"),
    (["config", "--preset", "debug", "--set", "model.hidden_size=abc"], "model.hidden_size"),
    (["config", "--preset", "debug", "--set", "model.moe_impl=cuda_magic"], "model.moe_impl"),
    (["config", "--preset", "debug", "--set", "train.ep_size=3"], "train.ep_size"),
    (["config", "--preset", "debug", "--set", "keep_ratio=0.5"], "--set"),
    (["config", "--preset", "debug", "--set", "model.preset=nope"], "model.preset"),
    (["config"], None),  # no preset/config is fine: defaults
    (["bogus-command"], "invalid choice"),
    (["train", "--config", "{d}/missing.toml"], "missing.toml"),
    (["train", "--preset", "debug", "--set", "data.path={d}/no_such_data"], "no_such_data"),
    (["demo", "--config", "{d}/missing.toml"], "missing.toml"),
    (["prepare", "--input", "{d}/no_such_input", "--output", "{d}/out"], "no_such_input"),
    (["prepare", "--output", "{d}/out"], "--input"),
    (["quality", "train", "--input", "{d}/no_such_labels.txt", "--output", "{d}/q.bin"], "no_such_labels"),
    (["quality"], "ACTION"),
    (["export", "--checkpoint", "{d}/no_such_run", "--out", "{d}/hf"], "no_such_run"),
    (["export", "--out", "{d}/hf"], "--checkpoint"),
    (["cost", "--preset", "debug", "--set", "cost.device=NOPE9000"], "NOPE9000"),
    (["cost", "--preset", "debug", "--from-run", "{d}/no_such_run"], "no_such_run"),
    (["tune", "--config", "{d}/missing.toml"], "missing.toml"),
]


@pytest.mark.parametrize("argv,needle", CASES, ids=[" ".join(c[0])[:60] for c in CASES])
def test_user_errors_are_one_line_exit_2(argv, needle, bad_files, capsys):
    argv = [a.format(d=bad_files) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse exits itself
        code = e.code
    out, err = capsys.readouterr()
    if needle is None:
        assert code == 0, err
        return
    assert code == 2, (code, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]


def test_help_lists_every_command():
    text = build_parser().format_help()
    for cmd in ("config", "train", "demo", "prepare", "quality", "export", "cost", "tune"):
        assert cmd in text
