"""Teacher actors for distillation: a frozen teacher model that turns token batches into compressed
soft labels (`dsv3ray.distill.SoftLabels`), and the pool the driver starts.

`TeacherWorker` is a plain class (tests drive it without Ray); `start_teacher_pool` wraps it with
`ray.remote` at the edge, with the resources, `max_restarts` and `max_task_retries` of [distill].
A restarted actor runs `__init__` again, i.e. reloads the teacher from its source, and Ray re-sends
the requests that were in flight (up to max_task_retries); the worker-side `Distiller` bounds the
wait with `timeout_s` and trains a late batch with CE.

A teacher source is either a path (a Hugging Face DeepseekV3 directory: config.json +
model.safetensors, or a finished run directory of ours with its final model in `hf/`; loaded by
`dsv3ray.hf.load_pretrained`) or a picklable zero-argument callable returning a model
(`InMemoryTeacher`: tests, in-process teachers).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dsv3ray.distill import TEACHER_EXPORT_DIR, DistillConfig, compress
from dsv3ray.errors import UserError
from dsv3ray.malloc import worker_env

TeacherSource = str | Callable[[], torch.nn.Module]


class InMemoryTeacher:
    """A teacher source from a ModelConfig and a state dict (a model trained in this process).

    Picklable by reference, so Ray can ship it to a (restarted) actor, which rebuilds the model.
    """

    def __init__(self, cfg, state_dict: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.state_dict = {k: v.detach().cpu() for k, v in state_dict.items()}

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> InMemoryTeacher:
        return cls(model.config, model.state_dict())

    def __call__(self) -> torch.nn.Module:
        from dsv3ray.model import build_model

        model = build_model(self.cfg)
        model.load_state_dict(self.state_dict)
        return model


def check_teacher_path(path: str) -> Path:
    """The model directory behind `distill.teacher` (checked on the driver, one-line UserError).

    Accepts a Hugging Face DeepseekV3 directory (config.json + *.safetensors) or a run directory
    of ours holding its exported final model in `<run_dir>/hf/` (`dsv3ray.distill.export_model`).
    """
    p = Path(path)
    if not p.exists():
        raise UserError(
            f"distill.teacher={path!r} does not exist: point it at a Hugging Face DeepseekV3 directory or a finished run directory"
        )
    for cand in (p, p / TEACHER_EXPORT_DIR):
        if (cand / "config.json").is_file() and any(cand.glob("*.safetensors")):
            return cand
    raise UserError(
        f"distill.teacher={path!r} holds no model (config.json + *.safetensors, or {TEACHER_EXPORT_DIR}/ of a finished run): "
        "train the teacher to the end first, or export it (dsv3ray export --checkpoint DIR --out DIR)"
    )


def load_teacher(source: TeacherSource) -> torch.nn.Module:
    if callable(source):
        return source()
    from dsv3ray.hf import load_pretrained

    return load_pretrained(str(check_teacher_path(source)))


class TeacherWorker:
    """Holds one teacher in eval mode; `label` runs it on a batch and compresses the logits."""

    def __init__(self, source: TeacherSource, cfg: DistillConfig, device: str | None = None):
        self.cfg = cfg
        if device is None:
            device = "cuda" if cfg.teacher_num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        t0 = time.perf_counter()
        self.model = load_teacher(source).to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.load_s = time.perf_counter() - t0
        self.num_labeled = 0

    def info(self) -> dict:
        """Liveness probe: which process, where, how long loading took."""
        return {
            "pid": os.getpid(),
            "device": str(self.device),
            "load_s": self.load_s,
            "num_labeled": self.num_labeled,
        }

    @torch.inference_mode()
    def label(self, input_ids_BS: np.ndarray, seed: int = 0) -> dict:
        """Soft labels for a (B, S) int batch, as `SoftLabels.to_dict()` plus `compute_s`."""
        t0 = time.perf_counter()
        x_BS = torch.as_tensor(np.asarray(input_ids_BS), dtype=torch.long, device=self.device)
        out = self.model(x_BS, labels_BS=x_BS)  # labels = inputs: the model shifts (data contract)
        gen = None
        if self.cfg.compression == "sample":
            gen = torch.Generator(device=self.device).manual_seed(int(seed))
        soft = compress(
            out.logits,
            self.cfg.compression,
            self.cfg.k,
            self.cfg.temperature,
            teacher_loss_B=out.loss_per_sample,
            generator=gen,
        )
        self.num_labeled += 1
        d = soft.to_dict()
        d["compute_s"] = time.perf_counter() - t0
        return d


def check_teacher_matches(path: str, student_vocab_size: int) -> None:
    """Soft labels are token ids: the teacher must speak the student's vocabulary."""
    from dsv3ray.hf import read_config

    teacher_vocab = read_config(check_teacher_path(path)).vocab_size
    if teacher_vocab != student_vocab_size:
        raise UserError(
            f"distill.teacher={path!r} has vocab_size={teacher_vocab} but model.vocab_size={student_vocab_size}: "
            "train the teacher on the same prepared data (same tokenizer) as the student"
        )


class TeacherPool(list):
    """The teacher actors' handles (picklable), plus what their restarts need to stay loadable."""

    source_ref = None


def start_teacher_pool(
    cfg: DistillConfig,
    source: TeacherSource | None = None,
    student_vocab_size: int | None = None,
    ready_timeout_s: float = 600.0,
) -> list:
    """Start `cfg.num_teachers` TeacherWorker actors and wait until each has loaded its teacher.

    Returns the actor handles (picklable: pass them to the training workers' `Distiller`).
    """
    import ray

    source = cfg.teacher if source is None else source
    if isinstance(source, str):
        check_teacher_path(source)
        if student_vocab_size is not None:
            check_teacher_matches(source, student_vocab_size)
    total = ray.cluster_resources()
    for res, need in (("CPU", cfg.teacher_num_cpus), ("GPU", cfg.teacher_num_gpus)):
        if need > total.get(res, 0.0):  # one teacher alone could never be placed: say so now
            key = "teacher_num_cpus" if res == "CPU" else "teacher_num_gpus"
            raise UserError(
                f"distill.{key}={need} but the Ray cluster has {total.get(res, 0.0):g} {res}s in total: "
                f"lower distill.{key} or run on a cluster with {res}s"
            )
    actor_cls = ray.remote(
        num_cpus=cfg.teacher_num_cpus,
        num_gpus=cfg.teacher_num_gpus,
        max_restarts=cfg.max_restarts,
        max_task_retries=cfg.max_task_retries,
        # glibc keeps freed tensors' memory (dsv3ray.malloc)
        runtime_env={"env_vars": worker_env(one_arena=cfg.teacher_num_gpus == 0)},
    )(TeacherWorker)
    handles = TeacherPool()
    if not isinstance(source, str):
        # An in-memory teacher goes to the object store once and the pool keeps that reference
        # alive: a restarted actor re-runs its constructor with the same argument, which Ray
        # would otherwise have freed after the first construction.
        handles.source_ref = source = ray.put(source)
    handles.extend(actor_cls.remote(source, cfg) for _ in range(cfg.num_teachers))
    try:
        ray.get([h.info.remote() for h in handles], timeout=ready_timeout_s)
    except ray.exceptions.GetTimeoutError:
        stop_teacher_pool(handles)
        raise UserError(
            f"teacher pool did not start within {ready_timeout_s:.0f}s: the cluster lacks "
            f"{cfg.num_teachers} x (num_cpus={cfg.teacher_num_cpus}, num_gpus={cfg.teacher_num_gpus}); "
            "lower distill.num_teachers or distill.teacher_num_cpus/teacher_num_gpus"
        ) from None
    except ray.exceptions.RayActorError as e:
        stop_teacher_pool(handles)
        raise UserError(
            f"teacher {cfg.teacher!r} failed to load in its actor ({e}): check distill.teacher"
        ) from None
    return handles


def stop_teacher_pool(handles: list) -> None:
    import ray

    for h in handles:
        ray.kill(h, no_restart=True)
    if isinstance(handles, TeacherPool):
        handles.source_ref = None
