"""Hugging Face interop: logits parity with transformers' DeepseekV3ForCausalLM both ways, layouts, export CLI."""

import argparse
import json

import pytest
import torch

from dsv3ray.errors import UserError
from dsv3ray.hf import cli_export, export_state_dict, load_pretrained, read_config, save_pretrained
from dsv3ray.model import ModelConfig, build_model

transformers = pytest.importorskip("transformers")

SMALL = dict(
    vocab_size=320, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3
)
CONFIGS = {
    "qlora-groups": dict(),
    "no-qlora-unnormed-tied-all-moe": dict(
        q_lora_rank=None,
        norm_topk_prob=False,
        first_k_dense_replace=0,
        tie_word_embeddings=True,
        routed_scaling_factor=2.5,
    ),
    "one-group-rotate-half-bias": dict(
        n_group=1, topk_group=1, num_experts_per_tok=3, rope_interleave=False, attention_bias=True
    ),
    "yarn-8groups": dict(
        n_routed_experts=16,
        n_group=8,
        topk_group=3,
        num_experts_per_tok=4,
        n_shared_experts=1,
        rope_scaling=dict(
            rope_type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=0.8, mscale_all_dim=1.0
        ),
    ),
}


pytestmark = pytest.mark.usefixtures("exact_fp32")


def _ours(cfg):
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)  # larger than init: routing and attention patterns matter
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)  # non-zero: must steer selection in HF too
    return model


def _hf_load(path):
    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(str(path), output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ours_to_hf_logits_match(name, tmp_path):
    cfg = ModelConfig(**SMALL, **CONFIGS[name])
    ours = _ours(cfg)
    save_pretrained(ours, tmp_path)
    hf = _hf_load(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # the bias matters: zeroing it changes the routing, hence the logits
    with torch.no_grad():
        for moe in ours.moe_layers():
            moe.gate.e_score_correction_bias.zero_()
        assert not torch.allclose(ours(ids).logits, b, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("name", ["qlora-groups", "no-qlora-unnormed-tied-all-moe"])
def test_hf_random_init_to_ours_logits_match(name, tmp_path):
    cfg = ModelConfig(**SMALL, **CONFIGS[name])
    hf = transformers.DeepseekV3ForCausalLM(cfg.to_hf_config()).eval()
    with torch.no_grad():
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    hf.save_pretrained(str(tmp_path))
    ours = load_pretrained(tmp_path)
    assert read_config(tmp_path) == ModelConfig.from_hf_dict(hf.config.to_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_per_expert_hub_layout_loads_in_both(tmp_path):
    cfg = ModelConfig(**SMALL)
    ours = _ours(cfg)
    save_pretrained(ours, tmp_path, layout="per_expert")
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        ref = ours(ids).logits
        torch.testing.assert_close(_hf_load(tmp_path)(ids).logits, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(load_pretrained(tmp_path)(ids).logits, ref)


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_mtp_and_our_knobs_round_trip(layout, tmp_path):
    cfg = ModelConfig(
        **SMALL, num_nextn_predict_layers=1, keep_ratio=0.25, mtp_loss_weight=0.5, moe_impl="torch"
    )
    ours = _ours(cfg)
    save_pretrained(ours, tmp_path, layout=layout)
    assert (tmp_path / "mtp.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "mtp.safetensors"), "pt") as f:  # hub naming: layer L
        keys = set(f.keys())
    L = cfg.num_hidden_layers
    assert {f"model.layers.{L}.enorm.weight", f"model.layers.{L}.shared_head.norm.weight"} <= keys
    assert (f"model.layers.{L}.mlp.experts.0.gate_proj.weight" in keys) == (layout == "per_expert")
    _hf_load(tmp_path)  # the main model still loads cleanly
    back = load_pretrained(tmp_path)
    assert back.config == cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        a, b = ours(ids, ids), back(ids, ids)
    assert a.mtp_loss.item() == b.mtp_loss.item() and a.loss.item() == b.loss.item()


@pytest.mark.parametrize("preset", ["debug", "16b", "671b"])
def test_config_crosses_over_both_ways(preset):
    cfg = ModelConfig.from_preset(preset)
    hf_cfg = cfg.to_hf_config()
    assert isinstance(hf_cfg, transformers.DeepseekV3Config)
    assert ModelConfig.from_hf_dict(hf_cfg.to_dict()) == cfg
    # a config built by transformers with its own keyword arguments crosses over as-is
    hf2 = transformers.DeepseekV3Config(
        hidden_size=64,
        num_hidden_layers=2,
        n_routed_experts=8,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=2,
        q_lora_rank=None,
    )
    ours = ModelConfig.from_hf_dict(hf2.to_dict())
    assert (ours.hidden_size, ours.n_routed_experts, ours.q_lora_rank, ours.vocab_size) == (
        64,
        8,
        None,
        129280,
    )
    assert ours.num_nextn_predict_layers == 1  # HF's num_mtp_layers


def test_cli_export_and_user_errors(tmp_path):
    cfg = ModelConfig(**SMALL)
    ours = _ours(cfg)
    src, out = tmp_path / "src", tmp_path / "out"
    save_pretrained(ours, src)
    assert cli_export(None, argparse.Namespace(checkpoint=str(src), out=str(out))) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "deepseek_v3"
    assert all(p.suffix in (".json", ".safetensors") for p in out.iterdir())  # no pickle anywhere
    ids = torch.randint(0, cfg.vocab_size, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(out)(ids).logits, ours(ids).logits)
    bad = [
        argparse.Namespace(checkpoint=str(tmp_path / "nope"), out=str(out)),
        argparse.Namespace(checkpoint=str(tmp_path), out=str(out)),  # no config.json there
        argparse.Namespace(checkpoint=str(src), out=None),
    ]
    for args in bad:
        with pytest.raises(UserError) as ei:
            cli_export(None, args)
        assert "\n" not in str(ei.value)
    with pytest.raises(UserError, match="gather the EP shards"):
        sd = ours.state_dict()
        sd["model.layers.1.mlp.experts.gate_up_proj"] = sd["model.layers.1.mlp.experts.gate_up_proj"][:4]
        export_state_dict(sd, cfg, tmp_path / "shard")
    (src / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_pretrained(src)
