"""Exactly-once curriculum sampler over the packed training rows (global sample ids 0..N-1).

Each epoch is a weighted order WITHOUT replacement (Efraimidis–Spirakis keys u^(1/w)) over the ids
not yet consumed in that epoch: with the curriculum on, hard samples come earlier in the epoch, so
their frequency in the late phase's batches rises, while every id is still consumed exactly once
per epoch. Global batches may straddle epochs (the tail of one epoch, then the head of the next).

Ledger: one numpy bitmap (N/8 bytes) per open epoch — at most two (the current one and the one a
straddling batch opened). The draw for a step uses a generator seeded by (seed, step), so it is a
pure function of (state, step): `batch_for_step` is idempotent (all ranks may ask), resume after
`load_state_dict` reproduces the same order, and the number of data-parallel workers does not
matter (ids are global; the trainer slices the global batch).

Protocol per step: ids = batch_for_step(step, B); ...train...; report_losses(ids, losses);
commit(step). A step may be asked for ahead (the trainer asks for step s+1 before training step s,
so the draw overlaps the compute): its ids are held while pending, and `state_dict` keeps the
pending draws, so a resume answers them as the run did (a draw made while step s was pending
cannot be recomputed once s is committed). A step first asked for after the checkpoint (crash) is
drawn again after restore.
"""

from __future__ import annotations

import numpy as np

from actors.curriculum import CurriculumConfig, CurriculumController


class CurriculumSampler:
    def __init__(
        self,
        num_samples: int,
        seed: int,
        curriculum_cfg: CurriculumConfig | None = None,
        total_samples: int | None = None,
    ):
        """total_samples: samples drawn over the whole run (steps * global batch), which the
        curriculum's warmup fraction refers to; None = one epoch."""
        if num_samples < 1:
            raise ValueError(f"CurriculumSampler needs at least one sample, got {num_samples}")
        self.num_samples = num_samples
        self.seed = int(seed)
        self.cfg = curriculum_cfg or CurriculumConfig()
        self.total_samples = int(total_samples or num_samples)
        self.controller = CurriculumController(num_samples, self.cfg)
        self.epoch = 0  # the oldest open epoch
        self.ledger = {0: np.zeros(self._nbytes, dtype=np.uint8)}  # epoch -> packed consumed bitmap
        self.samples_drawn = 0  # committed samples over the run (drives the schedule)
        self.last_step = -1  # last committed step
        self.duplicates = 0  # ids committed twice in one epoch: must stay 0
        self._pending: dict[int, list[tuple[int, np.ndarray]]] = {}  # step -> [(epoch, ids)]
        self._restored: set[int] = set()  # pending steps that came from load_state_dict

    @property
    def _nbytes(self) -> int:
        return (self.num_samples + 7) // 8

    def _consumed(self, epoch: int) -> np.ndarray:
        bits = self.ledger.get(epoch)
        if bits is None:
            return np.zeros(self.num_samples, dtype=bool)
        return np.unpackbits(bits, count=self.num_samples).astype(bool)

    def _progress(self) -> float:
        return min(1.0, self.samples_drawn / self.total_samples)

    def batch_for_step(self, step: int, global_batch: int) -> np.ndarray:
        """The global batch (int64 ids) of `step`; the same answer until the step is committed."""
        if global_batch < 1:
            raise ValueError(f"global_batch must be positive, got {global_batch}")
        if step <= self.last_step:
            raise ValueError(f"step {step} is already committed (last committed step {self.last_step})")
        if step in self._pending:
            parts = self._pending[step]
            got = sum(ids.size for _, ids in parts)
            if got == global_batch:
                return np.concatenate([ids for _, ids in parts])
            if step not in self._restored:
                raise ValueError(
                    f"step {step} was drawn with global batch {got}, now asked for {global_batch}"
                )
            # resumed with another global batch: the checkpoint's draws ahead no longer fit; their
            # ids were never committed, so they return to the pool and the steps are drawn anew
            for s in self._restored:
                self._pending.pop(s, None)
            self._restored.clear()
        rng = np.random.default_rng([self.seed, step])
        weights_N = self.controller.weights(self._progress())
        parts, need, epoch = [], global_batch, self.epoch
        while need > 0:
            taken = self._consumed(epoch)
            for pending in self._pending.values():  # a prefetched, uncommitted step holds its ids
                for e, ids in pending:
                    if e == epoch:
                        taken[ids] = True
            free = np.flatnonzero(~taken)
            if free.size == 0:
                epoch += 1
                continue
            u = rng.random(free.size)
            if weights_N is None:
                keys = u
            else:  # log of u^(1/w): larger = earlier; weights > 0 always
                keys = np.log(u + 1e-300) / weights_N[free]
            k = min(need, free.size)
            order = np.argsort(-keys, kind="stable")[:k]
            parts.append((epoch, free[order].astype(np.int64)))
            need -= k
            epoch += 1
        self._pending[step] = parts
        return np.concatenate([ids for _, ids in parts])

    def report_losses(self, ids, losses) -> None:
        self.controller.report(ids, losses)

    def commit(self, step: int) -> None:
        """Mark the ids of `step` consumed (call once the step's update is durable)."""
        if step not in self._pending:
            raise ValueError(f"commit({step}): that step was not drawn (or is already committed)")
        self._restored.discard(step)
        for epoch, ids in self._pending.pop(step):
            bits = self.ledger.setdefault(epoch, np.zeros(self._nbytes, dtype=np.uint8))
            consumed = np.unpackbits(bits, count=self.num_samples).astype(bool)
            self.duplicates += int(consumed[ids].sum())
            consumed[ids] = True
            self.ledger[epoch] = np.packbits(consumed)
            self.samples_drawn += int(ids.size)
        self.last_step = max(self.last_step, step)
        # close finished epochs: the ledger stays at one or two bitmaps
        while self._consumed(self.epoch).all():
            del self.ledger[self.epoch]
            self.epoch += 1
            self.ledger.setdefault(self.epoch, np.zeros(self._nbytes, dtype=np.uint8))

    def stats(self) -> dict:
        consumed = int(self._consumed(self.epoch).sum())
        return {
            "epoch": self.epoch,
            "consumed": consumed,
            "remaining": self.num_samples - consumed,
            "samples_drawn": self.samples_drawn,
            "duplicates": self.duplicates,
            "open_epochs": sorted(self.ledger),
            "curriculum_phase": "uniform" if self.controller.in_warmup(self._progress()) else "weighted",
            "progress": self._progress(),
        }

    def state_dict(self) -> dict:
        """Everything a resume needs, including the steps drawn ahead and not yet committed."""
        return {
            "num_samples": self.num_samples,
            "seed": self.seed,
            "total_samples": self.total_samples,
            "epoch": self.epoch,
            "ledger": {int(e): bits.copy() for e, bits in self.ledger.items()},
            "samples_drawn": self.samples_drawn,
            "last_step": self.last_step,
            "duplicates": self.duplicates,
            "controller": self.controller.state_dict(),
            "pending": {
                int(step): [(int(e), ids.copy()) for e, ids in parts] for step, parts in self._pending.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(
                f"sampler state is for {state['num_samples']} samples, this dataset has {self.num_samples}: "
                "resume with the same prepared data"
            )
        self.seed = int(state["seed"])
        self.total_samples = int(state["total_samples"])
        self.epoch = int(state["epoch"])
        self.ledger = {int(e): np.asarray(b, dtype=np.uint8).copy() for e, b in state["ledger"].items()}
        self.samples_drawn = int(state["samples_drawn"])
        self.last_step = int(state["last_step"])
        self.duplicates = int(state["duplicates"])
        self.controller.load_state_dict(state["controller"])
        self._pending = {  # absent in checkpoints written before draws ahead were kept
            int(step): [(int(e), np.asarray(ids, dtype=np.int64).copy()) for e, ids in parts]
            for step, parts in state.get("pending", {}).items()
        }
        self._restored = set(self._pending)
