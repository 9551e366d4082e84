"""The run config: composes each component's own section; knows no section's contents.

Precedence: `--preset NAME` < `--config FILE` < `--set section.key=value` (repeatable).
`[model] preset = "debug"` starts the model section from a named model preset.
Each component receives only its own dataclass (`run.model`, `run.train`, ...).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from dsv3ray.config import apply_overrides, deep_merge, load_toml, section_from_dict, to_dict
from dsv3ray.errors import ConfigError

# section -> "module:ConfigClass". Imported lazily so `dsv3ray config` stays fast and a section
# is only built where it is used.
SECTIONS: dict[str, str] = {
    "model": "dsv3ray.model:ModelConfig",
    "train": "dsv3ray.train:TrainConfig",
    "data": "dsv3ray.data:DataConfig",
    "prepare": "pipelines.prepare:PrepareConfig",
    "curriculum": "actors.curriculum:CurriculumConfig",
    "cost": "dsv3ray.cost:CostConfig",
    "distill": "dsv3ray.distill:DistillConfig",
    "tune": "dsv3ray.tune:TuneConfig",
    "hetero": "dsv3ray.hetero:HeteroConfig",
}
# Sections passed on as plain dicts after a loader function checked them.
RAW_SECTIONS: dict[str, str] = {"deepspeed": "dsv3ray.engine:load_deepspeed_section"}


def _load(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def available_sections() -> dict[str, str]:
    """Sections whose owning module exists in this install (later issues add theirs)."""
    out = {}
    for name, spec in SECTIONS.items():
        try:
            _load(spec)
        except (ImportError, AttributeError):
            continue
        out[name] = spec
    return out


def model_presets() -> dict[str, dict[str, Any]]:
    return _load("dsv3ray.model:MODEL_PRESETS")


def _model_section(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    name = data.pop("preset", None)
    if name is None:
        return data
    presets = model_presets()
    if name not in presets:
        raise ConfigError("model.preset", name, f"one of {', '.join(presets)}")
    return {**presets[name], **data}


@dataclass
class RunConfig:
    """The resolved run: one attribute per section plus the merged plain dict (`raw`)."""

    raw: dict[str, Any]
    sections: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str):
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for name, value in self.sections.items():
            out[name] = value if isinstance(value, dict) else to_dict(value)
        return out


def merge_sources(preset: str | None, config: str | None, overrides: list[str] | None) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    if preset is not None:
        if preset not in model_presets():
            raise ConfigError("--preset", preset, f"one of {', '.join(model_presets())}")
        raw = {"model": {"preset": preset}}
    if config is not None:
        raw = deep_merge(raw, load_toml(config))
    return apply_overrides(raw, overrides or [])


def resolve_run_config(
    preset: str | None = None, config: str | None = None, overrides: list[str] | None = None
) -> RunConfig:
    """Merge the sources, build and validate every section, then the cross-section rules."""
    raw = merge_sources(preset, config, overrides)
    known = available_sections()
    unknown = sorted(set(raw) - set(known) - set(RAW_SECTIONS))
    if unknown:
        allowed = sorted(set(known) | set(RAW_SECTIONS))
        hint = f"one of [{'], ['.join(allowed)}]"
        if unknown[0] in SECTIONS:
            hint = "that section is not built in this version"
        raise ConfigError(f"[{unknown[0]}]", raw[unknown[0]], f"unknown section; {hint}")
    for name, value in raw.items():
        if not isinstance(value, dict):
            raise ConfigError(name, value, f"[{name}] must be a table (section), not a value")
    run = RunConfig(raw=raw)
    for name, spec in known.items():
        data = raw.get(name, {})
        if name == "model":
            data = _model_section(data)
        run.sections[name] = section_from_dict(_load(spec), data, name)
    for name, spec in RAW_SECTIONS.items():
        try:
            loader = _load(spec)
        except (ImportError, AttributeError):
            run.sections[name] = dict(raw.get(name, {}))
            continue
        run.sections[name] = loader(dict(raw.get(name, {})))
    _check_cross_sections(run)
    return run


def _check_cross_sections(run: RunConfig) -> None:
    """Rules that need two sections; each section checks its own values itself."""
    model, train = run.sections.get("model"), run.sections.get("train")
    if model is None or train is None:
        return
    from dsv3ray.hetero import parse_num_workers

    ep = getattr(train, "ep_size", 1)
    # Elastic [min, max]: ep_size must divide the max; a smaller group runs at the largest EP size
    # it supports (hetero.elastic_ep_size), so the min needs no check.
    lo, workers = parse_num_workers(getattr(train, "num_workers", 1))
    if model.n_routed_experts % ep:
        raise ConfigError("train.ep_size", ep, f"must divide model.n_routed_experts={model.n_routed_experts}")
    if workers % ep:
        raise ConfigError(
            "train.ep_size",
            ep,
            f"must divide train.num_workers={workers}" + (" (the maximum)" if lo < workers else ""),
        )


def dump_toml(data: dict[str, Any]) -> str:
    """Minimal TOML writer for resolved configs (tables, scalars, lists)."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {scalar(x)}" for k, x in v.items() if x is not None) + " }"
        raise TypeError(type(v))

    lines: list[str] = []

    def table(prefix: str, d: dict[str, Any]) -> None:
        plain = {k: v for k, v in d.items() if not isinstance(v, dict) and v is not None}
        nested = {k: v for k, v in d.items() if isinstance(v, dict)}
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {scalar(v)}" for k, v in plain.items())
        if prefix:
            lines.append("")
        for k, v in nested.items():
            table(f"{prefix}.{k}" if prefix else k, v)

    table("", data)
    return "\n".join(lines).rstrip() + "\n"
