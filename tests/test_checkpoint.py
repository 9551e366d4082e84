"""Checkpoint manifests: complete checkpoints validate; interrupted/truncated ones fall back."""

import json

import pytest
import torch

from dsv3ray import checkpoint as ck


def _write_rank(root, rank, world, step, payload=b"x" * 100):
    d = root / ck.step_dir_name(step)
    (d / "ds").mkdir(parents=True, exist_ok=True)
    (d / "ds" / f"optim_rank{rank}.pt").write_bytes(payload)
    ck.save_rank_state(d, rank)
    ck.write_manifest(d, rank, world, step)
    return d


def test_valid_then_fallback_on_incomplete_and_truncated(tmp_path, capsys):
    for step in (10, 20):
        for r in range(2):
            _write_rank(tmp_path, r, 2, step)
    # step 30: rank 1 killed before its manifest
    d30 = _write_rank(tmp_path, 0, 2, 30)
    (d30 / "ds" / "optim_rank1.pt").write_bytes(b"partial")
    assert ck.validate(tmp_path / "step_00000020").ok
    v = ck.validate(d30)
    assert not v.ok and "ranks [1]" in v.reason
    assert ck.latest_valid(tmp_path).name == "step_00000020"
    # truncate a file of step 20 -> falls back to 10 with a clear line
    f = tmp_path / "step_00000020" / "ds" / "optim_rank1.pt"
    f.write_bytes(b"x" * 50)
    chosen = ck.choose_checkpoint(tmp_path / "step_00000020", tmp_path)
    assert chosen.name == "step_00000010"
    out = capsys.readouterr().out
    assert "incomplete" in out and "optim_rank1.pt" in out and "50 bytes" in out
    # a manifest claiming another step than the directory is rejected
    m = json.loads((tmp_path / "step_00000010" / "manifest" / "rank0.json").read_text())
    m["step"] = 11
    (tmp_path / "step_00000010" / "manifest" / "rank0.json").write_text(json.dumps(m))
    assert ck.latest_valid(tmp_path) is None
    assert ck.choose_checkpoint(None, tmp_path / "nothing") is None


def test_rng_roundtrip(tmp_path):
    torch.manual_seed(3)
    ck.save_rank_state(tmp_path, 0)
    a = torch.rand(4)
    torch.manual_seed(99)
    assert ck.load_rank_state(tmp_path, 0)
    assert torch.equal(torch.rand(4), a)
    assert not ck.load_rank_state(tmp_path, 5)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_state_files_load_without_unpickling_code(tmp_path):
    import pickle

    import numpy as np
    import torch

    from dsv3ray.checkpoint import load_train_state, save_train_state

    state = {"step": 3, "ledger": np.zeros(4, dtype=np.uint8), "rng": np.random.get_state()}
    save_train_state(tmp_path, state)
    back = load_train_state(tmp_path)
    assert back["step"] == 3 and back["rng"][0] == "MT19937"
    torch.save({"x": _Evil()}, tmp_path / "state.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_train_state(tmp_path)
