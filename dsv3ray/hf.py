"""Hugging Face interop: our model <-> a `DeepseekV3ForCausalLM` directory (config.json + safetensors).

Layout written: `config.json` (plain JSON, `model_type: deepseek_v3`; transformers is not needed
to write it) and `model.safetensors` with transformers 5's native key layout, the fused routed
experts `model.layers.{i}.mlp.experts.gate_up_proj` (E, 2I, D) / `.down_proj` (E, D, I), which
`transformers.DeepseekV3ForCausalLM.from_pretrained` loads with no missing or unexpected keys.
`layout="per_expert"` writes the hub's original per-expert keys
(`mlp.experts.{j}.{gate,up,down}_proj.weight`) instead; transformers converts those on load.
The MTP module (which transformers' class does not have) goes to `mtp.safetensors` under the
hub's names (`model.layers.{L}.{enorm,hnorm,eh_proj,shared_head.norm,...}`), so HF loads the main
model cleanly and `load_pretrained` restores everything. `load_pretrained` reads both layouts.
No pickle anywhere: safetensors and JSON only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from dsv3ray.errors import UserError
from dsv3ray.model import DeepseekV3ForCausalLM, ModelConfig, build_model

CONFIG_FILE, WEIGHTS_FILE, MTP_FILE = "config.json", "model.safetensors", "mtp.safetensors"
_OURS_KEY = "dsv3ray"  # our extra knobs (keep_ratio, moe_impl, ...) ride along in config.json


def _split_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig, layout: str):
    """Our state dict -> (main tensors in HF names, MTP tensors in hub names)."""
    if layout not in ("fused", "per_expert"):
        raise ValueError(f"layout must be 'fused' or 'per_expert', got {layout!r}")
    main, mtp = {}, {}
    L, I = cfg.num_hidden_layers, cfg.moe_intermediate_size
    for name, t in state_dict.items():
        t = t.detach().to("cpu").contiguous()
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied to model.embed_tokens.weight; transformers re-ties on load
        dest = main
        if name.startswith("mtp."):
            dest, rest = mtp, name[len("mtp.") :]
            if rest.startswith("block."):
                rest = rest[len("block.") :]
            elif rest.startswith("norm."):
                rest = "shared_head." + rest
            name = f"model.layers.{L}.{rest}"
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)", name)
        if m and layout == "per_expert":
            prefix, which = m.groups()
            for j in range(t.shape[0]):
                if which == "gate_up_proj":
                    dest[f"{prefix}.{j}.gate_proj.weight"] = t[j, :I].clone()
                    dest[f"{prefix}.{j}.up_proj.weight"] = t[j, I:].clone()
                else:
                    dest[f"{prefix}.{j}.down_proj.weight"] = t[j].clone()
            continue
        dest[name] = t
    return main, mtp


def export_state_dict(
    state_dict: dict[str, torch.Tensor], cfg: ModelConfig, out: str | Path, layout: str = "fused"
) -> Path:
    """Write a full (all experts) state dict of our model as a HF DeepseekV3 directory.

    Training code calls this with the consolidated fp32/bf16 state dict of one model replica
    (keys as `DeepseekV3ForCausalLM(cfg).state_dict()`; EP shards must be gathered first).
    """
    from safetensors.torch import save_file

    out = Path(out)
    expected = _expected_keys(cfg)
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise UserError(
            f"state dict to export lacks {len(missing)} keys (first: {missing[0]}): pass the full model's state dict"
        )
    for k in (f"model.layers.{i}.mlp.experts.gate_up_proj" for i in range(cfg.num_hidden_layers)):
        if k in state_dict and state_dict[k].shape[0] != cfg.n_routed_experts:
            raise UserError(
                f"{k} holds {state_dict[k].shape[0]} of {cfg.n_routed_experts} experts: gather the EP shards before exporting"
            )
    out.mkdir(parents=True, exist_ok=True)
    main, mtp = _split_state_dict({k: state_dict[k] for k in expected}, cfg, layout)
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = str(next(iter(main.values())).dtype).removeprefix("torch.")
    hf[_OURS_KEY] = {
        k: getattr(cfg, k)
        for k in ("keep_ratio", "moe_impl", "mtp_loss_weight", "bias_update_speed", "seq_aux_loss_alpha")
    }
    (out / CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
    save_file(main, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    if mtp:
        save_file(mtp, str(out / MTP_FILE), metadata={"format": "pt"})
    elif (out / MTP_FILE).exists():
        (out / MTP_FILE).unlink()
    return out


def _expected_keys(cfg: ModelConfig) -> list[str]:
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg)
    return list(model.state_dict().keys())


def save_pretrained(model: DeepseekV3ForCausalLM, path: str | Path, layout: str = "fused") -> Path:
    """Our model (single rank, all experts) -> a directory `transformers` loads."""
    if model.ep is not None and model.ep.ep_size > 1:
        raise UserError(
            "save_pretrained needs all experts on one rank: gather the EP shards (export_state_dict) instead"
        )
    return export_state_dict(model.state_dict(), model.config, path, layout)


def read_config(path: str | Path) -> ModelConfig:
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        raise UserError(
            f"{p} does not exist: pass a directory written by save_pretrained or a HF DeepseekV3 model directory"
        )
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p} is not valid JSON ({e}): re-export the model") from None
    if d.get("model_type") != "deepseek_v3":
        raise UserError(f"{p} has model_type={d.get('model_type')!r}: only deepseek_v3 models are supported")
    return ModelConfig.from_hf_dict(d, **d.get(_OURS_KEY, {}))


def _hf_to_ours(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF/hub key names (fused or per-expert experts, MTP as layer L) -> our state dict keys."""
    L, fused, per_expert = cfg.num_hidden_layers, {}, {}
    for name, t in tensors.items():  # 1) per-expert hub keys -> fused (E, 2I, D) / (E, D, I)
        m = re.fullmatch(
            r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", name
        )
        if m:
            per_expert.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = t
        else:
            fused[name] = t
    for prefix, parts in per_expert.items():
        try:
            gate_up = [
                torch.cat([parts[(j, "gate_proj")], parts[(j, "up_proj")]])
                for j in range(cfg.n_routed_experts)
            ]
            down = [parts[(j, "down_proj")] for j in range(cfg.n_routed_experts)]
        except KeyError as e:
            j, which = e.args[0]
            raise UserError(
                f"checkpoint lacks {prefix}.{j}.{which}.weight: the expert weights are incomplete"
            ) from None
        fused[f"{prefix}.gate_up_proj"], fused[f"{prefix}.down_proj"] = (
            torch.stack(gate_up),
            torch.stack(down),
        )
    out = {}
    for name, t in fused.items():  # 2) the MTP module, hub layer L, -> mtp.*
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.*)", name)
        if not (m and int(m.group(1)) == L):
            out[name] = t
            continue
        rest = m.group(2)
        if rest.startswith(("enorm.", "hnorm.", "eh_proj.")):
            out[f"mtp.{rest}"] = t
        elif rest.startswith("shared_head.norm."):
            out[f"mtp.{rest[len('shared_head.') :]}"] = t
        elif not rest.startswith(("embed_tokens.", "shared_head.head.")):  # those are shared
            out[f"mtp.block.{rest}"] = t
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def load_pretrained(path: str | Path, ep=None, strict: bool = True) -> DeepseekV3ForCausalLM:
    """A HF DeepseekV3 directory (ours or transformers', fused or per-expert keys) -> our model."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = read_config(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} holds no *.safetensors weights: pass a directory written by save_pretrained")
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f)))
    sd = _hf_to_ours(tensors, cfg)
    model = build_model(cfg, ep)
    if ep is not None:  # keep this rank's expert slice
        own = model.state_dict()
        for k, v in list(sd.items()):
            if (
                k.endswith((".experts.gate_up_proj", ".experts.down_proj"))
                and k in own
                and own[k].shape[0] != v.shape[0]
            ):
                first = ep.local_experts(cfg.n_routed_experts).start
                sd[k] = v[first : first + own[k].shape[0]]
    own_keys = set(model.state_dict())
    if cfg.tie_word_embeddings:
        own_keys.discard("lm_head.weight")
    missing, unexpected = sorted(own_keys - set(sd)), sorted(set(sd) - own_keys)
    if strict and (missing or unexpected):
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"weights in {path} do not match its config.json ({what}): re-export the model")
    model.load_state_dict({k: v for k, v in sd.items() if k in own_keys}, strict=False)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def cli_export(run, args) -> int:
    """`dsv3ray export --checkpoint DIR --out DIR`: a model directory of ours -> HF format.

    Accepts a directory holding `config.json` + `model.safetensors` (ours or HF); training run
    directories are handled by the training layer calling `export_state_dict`.
    """
    src = Path(getattr(args, "checkpoint", "") or "")
    out = getattr(args, "out", None)
    if not out:
        raise UserError("export needs --out DIR: the directory to write the Hugging Face model to")
    if not src.is_dir():
        raise UserError(f"--checkpoint {src} is not a directory: pass a model or training run directory")
    if not (src / CONFIG_FILE).is_file() or not any(src.glob("*.safetensors")):
        raise UserError(
            f"--checkpoint {src} holds no config.json + model.safetensors: pass a directory written by save_pretrained"
        )
    model = load_pretrained(src)
    save_pretrained(model, out)
    print(f"exported {src} -> {out} (config.json, {WEIGHTS_FILE})")
    return 0
