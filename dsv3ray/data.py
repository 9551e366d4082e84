"""Training-side data path: where a run's tokens come from and how they reach the workers.

`[data]` names either a prepared directory (the pipelines' contract: train/ and eval/ parquet,
tokenizer.json, meta.json) or raw inputs; with raw inputs the run first prepares them into
`<run_dir>/data` with `pipelines.prepare.prepare`. Rows reach each worker through
`ray.train.get_dataset_shard`; the train split is NOT split across workers (every worker may be
handed any sample id by the curriculum sampler), so each worker holds an id -> tokens table:
memory = num_samples * (seq_len + 1) * 4 bytes per worker (int32), e.g. 100k samples of 512
tokens = 205 MB per worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsv3ray.errors import ConfigError


@dataclass
class DataConfig:
    # A prepared directory (contract of pipelines.prepare); "" = prepare `inputs` first.
    prepared: str = ""
    # Raw inputs (files or globs: jsonl / parquet / txt) or "corpus:stdlib" for the built-in demo
    # corpus; used only when `prepared` is empty.
    inputs: list[str] = field(default_factory=list)
    # (Neither set is allowed here so other commands can omit [data]; `train` checks it.)
    # Held-out split used for eval loss.
    eval_split: str = "eval"

    def __post_init__(self):
        if self.prepared and self.inputs:
            raise ConfigError(
                "data.inputs", self.inputs, "give either data.prepared or data.inputs, not both"
            )
        if self.eval_split not in ("eval", "train"):
            raise ConfigError(
                "data.eval_split", self.eval_split, '"eval" (or "train" to evaluate on training rows)'
            )
