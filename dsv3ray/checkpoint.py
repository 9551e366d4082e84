"""Checkpoints: atomic per-rank writes, manifests written last, validation and fallback on load.

A checkpoint directory (`step_00000040/`) is the union of what every rank wrote into its own
temporary directory; Ray Train's `report(checkpoint=...)` merges the ranks' directories into
persistent storage (`<run_dir>/ray/<name>/step_00000040/`). Layout:

    ds/                    DeepSpeed engine checkpoint (tag "step"): module, ZeRO optimizer
                           partitions, one file per global routed expert (any EP size can load it)
    state.pt               (rank 0) step, tokens, bad-step counters, sampler ledger, loss history
    rng/rank{r}.pt         python / numpy / torch RNG states of rank r
    manifest/rank{r}.json  written LAST by rank r: {step, world_size, files: {path: size}}

A checkpoint is valid when every rank 0..world_size-1 left a manifest for the same step and
every file each manifest lists exists with the listed size. An incomplete newest checkpoint
(a rank killed mid-write, a truncated upload) is skipped with one line and the previous valid
one is used; nothing here deletes checkpoints (Ray Train's `num_to_keep` does).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

STEP_DIR_RE = re.compile(r"^step_(\d{8})$")
MANIFEST_DIR = "manifest"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _files_under(root: Path) -> dict[str, int]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if not rel.startswith(MANIFEST_DIR + "/"):
                out[rel] = p.stat().st_size
    return out


def write_manifest(
    ckpt_dir: str | Path, rank: int, world_size: int, step: int, extra: dict | None = None
) -> Path:
    """Record every file this rank wrote (with sizes) and publish it atomically (tmp + rename).

    Call it LAST, after all of this rank's files are flushed: a manifest means "my part is done".
    """
    root = Path(ckpt_dir)
    files = _files_under(root)
    body = {"rank": rank, "world_size": world_size, "step": step, "files": files, **(extra or {})}
    mdir = root / MANIFEST_DIR
    mdir.mkdir(parents=True, exist_ok=True)
    final = mdir / f"rank{rank}.json"
    tmp = mdir / f".rank{rank}.json.tmp"
    with tmp.open("w") as f:
        json.dump(body, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final


@dataclass
class Validation:
    ok: bool
    step: int
    world_size: int
    reason: str = ""


def validate(ckpt_dir: str | Path) -> Validation:
    """Check the manifests of a merged checkpoint directory: all ranks, same step, files and sizes."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return Validation(False, -1, 0, f"{root} is not a directory")
    mdir = root / MANIFEST_DIR
    manifests = {}
    for p in sorted(mdir.glob("rank*.json")) if mdir.is_dir() else []:
        try:
            m = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            return Validation(False, -1, 0, f"manifest {p.name} unreadable ({e})")
        manifests[int(m["rank"])] = m
    if not manifests:
        return Validation(False, -1, 0, "no manifest (write interrupted)")
    world = {m["world_size"] for m in manifests.values()}
    steps = {m["step"] for m in manifests.values()}
    if len(world) != 1 or len(steps) != 1:
        return Validation(
            False, -1, 0, f"manifests disagree (world sizes {sorted(world)}, steps {sorted(steps)})"
        )
    (world_size,), (step,) = world, steps
    missing_ranks = sorted(set(range(world_size)) - set(manifests))
    if missing_ranks:
        return Validation(
            False, step, world_size, f"ranks {missing_ranks} of {world_size} never finished writing"
        )
    m = STEP_DIR_RE.match(root.name)
    if m and int(m.group(1)) != step:
        return Validation(
            False, step, world_size, f"directory name says step {int(m.group(1))}, manifests say {step}"
        )
    for rank, man in sorted(manifests.items()):
        for rel, size in man["files"].items():
            p = root / rel
            if not p.is_file():
                return Validation(False, step, world_size, f"rank {rank}: file {rel} missing")
            if p.stat().st_size != size:
                return Validation(
                    False,
                    step,
                    world_size,
                    f"rank {rank}: file {rel} has {p.stat().st_size} bytes, manifest says {size}",
                )
    return Validation(True, step, world_size)


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """All `step_XXXXXXXX` directories anywhere under root (Ray nests them), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.rglob("step_*"):
        m = STEP_DIR_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_valid(root: str | Path, before_step: int | None = None) -> Path | None:
    """Newest valid checkpoint under root (optionally older than before_step); logs each skip."""
    for step, path in reversed(list_checkpoints(root)):
        if before_step is not None and step >= before_step:
            continue
        v = validate(path)
        if v.ok:
            return path
        log.warning("checkpoint %s is incomplete (%s): falling back to the previous one", path, v.reason)
    return None


def choose_checkpoint(candidate: str | Path | None, search_root: str | Path | None) -> Path | None:
    """The checkpoint to resume from: `candidate` if valid, else the newest valid one under search_root.

    Prints one line when it falls back, so a user sees why an older step was loaded.
    """
    if candidate is not None:
        v = validate(candidate)
        if v.ok:
            return Path(candidate)
        step = v.step if v.step >= 0 else _step_of(candidate)
        print(
            f"[dsv3ray] checkpoint {candidate} is incomplete ({v.reason}); falling back to the previous valid checkpoint",
            flush=True,
        )
        if search_root is not None:
            return latest_valid(search_root, before_step=step)
        return None
    return latest_valid(search_root) if search_root is not None else None


def _step_of(path: str | Path) -> int | None:
    m = STEP_DIR_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


# --- per-rank state ----------------------------------------------------------------------------


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


# What our own state files may contain besides tensors and plain Python: numpy arrays (RNG state,
# the sampler's ledger bitmaps). Loading allows exactly these, never arbitrary pickled objects.
_NUMPY_SAFE = [
    np.ndarray,
    np.dtype,
    np._core.multiarray._reconstruct,
    *{type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"},
]


def load_state_file(path: str | Path):
    """torch.load with weights_only=True (tensors, numpy arrays and plain data; no pickled code)."""
    with torch.serialization.safe_globals(_NUMPY_SAFE):
        return torch.load(path, map_location="cpu", weights_only=True)


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rank_state(ckpt_dir: str | Path, rank: int) -> None:
    d = Path(ckpt_dir) / "rng"
    d.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), d / f"rank{rank}.pt")


def load_rank_state(ckpt_dir: str | Path, rank: int) -> bool:
    """Restore this rank's RNG; False when the checkpoint came from fewer ranks (then reseed)."""
    p = Path(ckpt_dir) / "rng" / f"rank{rank}.pt"
    if not p.is_file():
        return False
    set_rng_state(load_state_file(p))
    return True


def save_train_state(ckpt_dir: str | Path, state: dict) -> None:
    """Rank 0's run state: step, tokens, counters, the sampler ledger (saved WITH the weights)."""
    torch.save(state, Path(ckpt_dir) / "state.pt")


def load_train_state(ckpt_dir: str | Path) -> dict:
    return load_state_file(Path(ckpt_dir) / "state.pt")
