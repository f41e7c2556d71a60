"""Registration holds an adapter's config to its tensors as PEFT's loading does: one test per
kind of mismatch, and the readings PEFT accepts that must stay accepted. No model: the base
is a described two-block Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loramux.errors import InvalidArgument
from loramux.lora.peft_rules import SERVED, BaseModules
from loramux.lora.store import AdapterStore

HIDDEN, KV, MLP = 16, 8, 24
SHAPES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, KV), "self_attn.v_proj": (HIDDEN, KV),
          "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (HIDDEN, MLP), "mlp.up_proj": (HIDDEN, MLP),
          "mlp.down_proj": (MLP, HIDDEN)}
LAYERS = {f"model.layers.{i}.{n}": shape for i in range(2) for n, shape in SHAPES.items()}


def llama_base(model_type: str | None = "llama") -> BaseModules:
    """The module list PEFT walks on a two-block LlamaForCausalLM."""
    kinds = {"model": "LlamaModel", "model.embed_tokens": "Embedding", "model.layers": "ModuleList"}
    for i in range(2):
        kinds |= {f"model.layers.{i}": "LlamaDecoderLayer", f"model.layers.{i}.self_attn": "LlamaAttention",
                  f"model.layers.{i}.mlp": "LlamaMLP", f"model.layers.{i}.mlp.act_fn": "SiLU"}
        kinds |= {f"model.layers.{i}.{n}": SERVED for n in SHAPES}
    kinds |= {"model.norm": "LlamaRMSNorm", "lm_head": "Linear"}
    return BaseModules(kinds, frozenset([*LAYERS, "lm_head"]), "lm_head", model_type)


@pytest.fixture
def store(tmp_path) -> AdapterStore:
    return AdapterStore(LAYERS, (tmp_path.resolve(),), 16, 1 << 20, torch.float32, base=llama_base())


def write(folder: Path, config: dict, ranks: dict[str, int], keys: str = "base_model.model.{m}.lora_{ab}.weight",
          extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A PEFT folder: `config` over PEFT's defaults, and lora_A/lora_B of `ranks[module]`."""
    folder.mkdir(parents=True, exist_ok=True)
    full = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]} | config
    (folder / "adapter_config.json").write_text(json.dumps({k: v for k, v in full.items() if v is not ...}))
    tensors = dict(extra or {})
    for module, r in ranks.items():
        fan_in, fan_out = LAYERS[module]
        tensors[keys.format(m=module, ab="A")] = torch.randn(r, fan_in)
        tensors[keys.format(m=module, ab="B")] = torch.randn(fan_out, r)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def modules(*names: str, layers: tuple[int, ...] = (0, 1)) -> list[str]:
    return [f"model.layers.{i}.{n}" for i in layers for n in SHAPES if n.endswith(names)]


QV = modules("q_proj", "v_proj")


def inspect(store, tmp_path, config: dict, ranks: dict[str, int], **kwargs):
    return store.inspect("a", write(tmp_path / "a", config, ranks, **kwargs), "rpc")


def refused(store, tmp_path, config: dict, ranks: dict[str, int], **kwargs) -> str:
    with pytest.raises(InvalidArgument) as err:
        inspect(store, tmp_path, config, ranks, **kwargs)
    return str(err.value)


# --- r and rank_pattern against every lora_A / lora_B shape ---------------------------

def test_r_must_match_the_tensors(store, tmp_path):
    msg = refused(store, tmp_path, {"r": 8}, dict.fromkeys(QV, 4))
    assert "r=8" in msg and "lora_A [4, 16]" in msg and "rank 4" in msg and "size mismatch" in msg


def test_rank_pattern_must_match_the_tensors(store, tmp_path):
    ranks = {m: 4 if m.endswith("q_proj") else 8 for m in QV}
    msg = refused(store, tmp_path, {"r": 8, "rank_pattern": {"q_proj": 2}}, ranks)
    assert "rank_pattern['q_proj']=2" in msg and "rank 4" in msg


def test_rank_pattern_gives_each_module_its_rank(store, tmp_path):
    ranks = {m: 4 if m.endswith("q_proj") else 8 for m in QV}
    record = inspect(store, tmp_path, {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}}, ranks)
    assert record.rank == 8
    assert record.scalings["model.layers.0.self_attn.q_proj"] == 4.0  # 16 / 4
    assert record.scalings["model.layers.0.self_attn.v_proj"] == 2.0  # 16 / 8


def test_rank_pattern_as_a_regex_over_the_full_name(store, tmp_path):
    ranks = {m: 4 if m.startswith("model.layers.1.") else 8 for m in QV}
    assert inspect(store, tmp_path, {"r": 8, "rank_pattern": {r"layers\.1\..*": 4}}, ranks).rank == 8


@pytest.mark.parametrize("r", [8.0, "8", True, 0, -8, None])
def test_r_must_be_a_positive_integer(store, tmp_path, r):
    assert "positive integer" in refused(store, tmp_path, {"r": r}, dict.fromkeys(QV, 8))


def test_an_unused_r_is_not_read(store, tmp_path):
    # PEFT reads r only where no rank_pattern key matches.
    assert inspect(store, tmp_path, {"r": "x", "rank_pattern": {"q_proj": 4, "v_proj": 4}}, dict.fromkeys(QV, 4))


def test_lora_a_and_b_of_different_ranks(store, tmp_path):
    folder = write(tmp_path / "a", {"r": 4}, dict.fromkeys(QV, 4))
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(HIDDEN, 2)}
    save_file(load_file(str(folder / "adapter_model.safetensors")) | tensors, str(folder / "adapter_model.safetensors"))
    assert "rank 4 / 2" in str(pytest.raises(InvalidArgument, store.inspect, "a", folder, "rpc").value)


# --- target_modules (list, regex, layers_to_transform, layers_pattern), both directions ---

def test_tensors_of_a_module_the_config_does_not_target(store, tmp_path):
    msg = refused(store, tmp_path, {"target_modules": ["q_proj"]}, dict.fromkeys(QV, 8))
    assert "does not select model.layers.0.self_attn.v_proj" in msg and "unexpected" in msg and "1 more" in msg


def test_a_targeted_module_without_tensors(store, tmp_path):
    msg = refused(store, tmp_path, {"target_modules": ["q_proj", "v_proj", "k_proj"]}, dict.fromkeys(QV, 8))
    assert "selects model.layers.0.self_attn.k_proj" in msg and "missing" in msg


def test_targets_that_exist_nowhere_beside_ones_that_do_are_fine(store, tmp_path):
    # PEFT refuses only when nothing matches; an extra name that matches nothing is ignored.
    assert inspect(store, tmp_path, {"target_modules": ["q_proj", "v_proj", "x_proj"]}, dict.fromkeys(QV, 8))


def test_targets_that_match_nothing(store, tmp_path):
    assert "selects no module" in refused(store, tmp_path, {"target_modules": ["x_proj"]}, dict.fromkeys(QV, 8))


def test_full_names_in_target_modules(store, tmp_path):
    ranks = dict.fromkeys(modules("q_proj", layers=(1,)), 8)
    assert inspect(store, tmp_path, {"target_modules": ["model.layers.1.self_attn.q_proj"]}, ranks)


def test_regex_target_modules_are_full_matches(store, tmp_path):
    assert inspect(store, tmp_path, {"target_modules": r".*\.(q_proj|v_proj)"}, dict.fromkeys(QV, 8))
    # re.fullmatch: "q_proj" alone matches no full module name
    assert "selects no module" in refused(store, tmp_path, {"target_modules": "q_proj"}, dict.fromkeys(QV, 8))
    msg = refused(store, tmp_path, {"target_modules": r".*layers\.1\.self_attn\.(q|v)_proj"}, dict.fromkeys(QV, 8))
    assert "does not select model.layers.0" in msg


def test_layers_to_transform(store, tmp_path):
    layer1 = dict.fromkeys(modules("q_proj", "v_proj", layers=(1,)), 8)
    assert inspect(store, tmp_path, {"layers_to_transform": [1]}, layer1)
    assert inspect(store, tmp_path, {"layers_to_transform": 1}, layer1)
    assert "does not select model.layers.0" in refused(store, tmp_path, {"layers_to_transform": [1]},
                                                       dict.fromkeys(QV, 8))
    assert "selects model.layers.0" in refused(store, tmp_path, {"layers_to_transform": [0, 1]}, layer1)


def test_layers_pattern(store, tmp_path):
    layer0 = dict.fromkeys(modules("q_proj", "v_proj", layers=(0,)), 8)
    assert inspect(store, tmp_path, {"layers_to_transform": [0], "layers_pattern": "layers"}, layer0)
    msg = refused(store, tmp_path, {"layers_to_transform": [0], "layers_pattern": ["h", "blocks"]}, layer0)
    assert "selects no module" in msg and "layers_pattern=['h', 'blocks']" in msg


def test_config_peft_refuses_outright(store, tmp_path):
    msg = refused(store, tmp_path, {"layers_pattern": "layers"}, dict.fromkeys(QV, 8))
    assert "PEFT refuses this config" in msg and "layers_to_transform" in msg


def test_exclude_modules(store, tmp_path):
    config = {"exclude_modules": ["model.layers.0.self_attn.q_proj"]}
    assert "does not select model.layers.0.self_attn.q_proj" in refused(store, tmp_path, config, dict.fromkeys(QV, 8))
    assert inspect(store, tmp_path, config, {m: 8 for m in QV if m != "model.layers.0.self_attn.q_proj"})


def test_all_linear_leaves_the_head_out(store, tmp_path):
    record = inspect(store, tmp_path, {"target_modules": "all-linear"}, dict.fromkeys(LAYERS, 8))
    assert len(record.tensor_names) == len(LAYERS)
    assert "selects model.layers.0.self_attn.k_proj" in refused(store, tmp_path, {"target_modules": "ALL-LINEAR"},
                                                             dict.fromkeys(QV, 8))


def test_no_target_modules_means_peft_default_for_the_architecture(store, tmp_path):
    assert inspect(store, tmp_path, {"target_modules": ...}, dict.fromkeys(QV, 8))  # llama: q_proj, v_proj
    assert inspect(store, tmp_path, {"target_modules": None}, dict.fromkeys(QV, 8))
    unknown = AdapterStore(LAYERS, (tmp_path.resolve(),), 16, 1 << 20, torch.float32, base=llama_base(None))
    assert "set target_modules" in refused(unknown, tmp_path, {"target_modules": None}, dict.fromkeys(QV, 8))


def test_targets_loramux_does_not_serve(store, tmp_path):
    msg = refused(store, tmp_path, {"target_modules": ["q_proj", "v_proj", "lm_head"]}, dict.fromkeys(QV, 8))
    assert "lm_head (Linear) is not supported by loramux" in msg
    msg = refused(store, tmp_path, {"target_modules": ["q_proj", "v_proj", "self_attn"]}, dict.fromkeys(QV, 8))
    assert "self_attn (LlamaAttention) is not supported" in msg


def test_bad_regexes_are_refused(store, tmp_path):
    assert "PEFT cannot match" in refused(store, tmp_path, {"target_modules": "(q_proj"}, dict.fromkeys(QV, 8))
    assert "not a valid regex" in refused(store, tmp_path, {"rank_pattern": {"(q": 4}}, dict.fromkeys(QV, 8))


# --- lora_alpha, alpha_pattern, use_rslora as PEFT reads them ---------------------------

def scaling(store, tmp_path, config: dict, rank: int = 8) -> dict[str, float]:
    record = inspect(store, tmp_path, {"r": rank} | config, dict.fromkeys(QV, rank))
    return {m.rsplit(".", 1)[-1]: s for m, s in record.scalings.items()}


def test_alpha_pattern_and_rslora(store, tmp_path):
    assert scaling(store, tmp_path, {"lora_alpha": 16, "alpha_pattern": {"v_proj": 4}}) == {"q_proj": 2.0,
                                                                                             "v_proj": 0.5}
    assert scaling(store, tmp_path, {"lora_alpha": 16, "use_rslora": True}, rank=4) == {"q_proj": 8.0, "v_proj": 8.0}
    # PEFT tests use_rslora for truth: the string "false" turns it on
    assert scaling(store, tmp_path, {"lora_alpha": 8, "use_rslora": "false"}, rank=4)["q_proj"] == 4.0
    assert scaling(store, tmp_path, {"lora_alpha": 16, "alpha_pattern": {"q_proj": 2}, "use_rslora": True},
                   rank=4) == {"q_proj": 1.0, "v_proj": 8.0}


@pytest.mark.parametrize("alpha", [0, -16, 0.5])
def test_alpha_peft_takes(store, tmp_path, alpha):
    assert scaling(store, tmp_path, {"lora_alpha": alpha})["q_proj"] == alpha / 8


@pytest.mark.parametrize("alpha,field", [(math.nan, "lora_alpha"), ("16", "lora_alpha"), (math.inf, "alpha_pattern")])
def test_alpha_that_is_not_a_finite_number(store, tmp_path, alpha, field):
    config = {"lora_alpha": alpha} if field == "lora_alpha" else {"alpha_pattern": {"q_proj": alpha}}
    assert field in refused(store, tmp_path, config, dict.fromkeys(QV, 8))


# --- tensor names, config fields, variants ----------------------------------------------

def test_tensor_names_as_peft_loads_them(store, tmp_path):
    assert inspect(store, tmp_path, {}, dict.fromkeys(QV, 8), keys="base_model.model.{m}.lora_{ab}.default.weight")
    for keys in ("{m}.lora_{ab}.weight", "base_model.model.{m}.lora_{ab}.other.weight"):
        assert "unsupported tensor" in refused(store, tmp_path, {}, dict.fromkeys(QV, 8), keys=keys)


def test_other_tensors_are_refused(store, tmp_path):
    extra = {"base_model.model.model.layers.0.self_attn.q_proj.bias": torch.zeros(HIDDEN)}
    assert "unsupported tensor" in refused(store, tmp_path, {"bias": "all"}, dict.fromkeys(QV, 8), extra=extra)


@pytest.mark.parametrize("config", [
    {"fan_in_fan_out": True}, {"bias": "all"}, {"bias": "lora_only"}, {"lora_dropout": 0.3},
    {"init_lora_weights": "gaussian"}, {"modules_to_save": []}, {"modules_to_save": None},
    {"task_type": "CAUSAL_LM", "inference_mode": False, "base_model_name_or_path": "x"}, {"some_future_field": 1},
    {"ensure_weight_tying": True},
])
def test_fields_without_effect_on_the_forward_are_accepted(store, tmp_path, config):
    assert inspect(store, tmp_path, config, dict.fromkeys(QV, 8))


@pytest.mark.parametrize("config,words", [
    ({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"lora_bias": True}, "lora_bias"), ({"layer_replication": [[0, 2]]}, "layer_replication"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"), ({"init_lora_weights": "olora"}, "olora"),
])
def test_variants_loramux_does_not_serve(store, tmp_path, config, words):
    msg = refused(store, tmp_path, config, dict.fromkeys(QV, 8))
    assert words in msg and "not supported by loramux" in msg


@pytest.mark.parametrize("config,words", [
    ({"peft_type": ...}, "peft_type is missing"), ({"peft_type": "lora"}, "'lora'"), ({"peft_type": "IA3"}, "IA3"),
    ({"bias": "some"}, "bias='some'"), ({"rank_pattern": None}, "rank_pattern=None"),
    ({"target_modules": 3}, "target_modules=3"),
])
def test_configs_peft_refuses(store, tmp_path, config, words):
    assert words in refused(store, tmp_path, config, dict.fromkeys(QV, 8))


def test_describe_base_on_a_real_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from loramux.lora.layers import attach_stacked_lora
    from loramux.lora.peft_rules import describe_base

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    _, layers = attach_stacked_lora(model, 2, 4, torch.float32, torch.device("cpu"))
    base = describe_base(model, layers)
    assert base.model_type == "llama" and base.output_name == "lm_head"
    assert {n for n, k in base.kinds.items() if k == SERVED} == set(LAYERS) == set(layers)
    assert base.linear == {*LAYERS, "lm_head"}
    assert base.kinds["model.layers.0.self_attn"] == "LlamaAttention" and base.kinds["lm_head"] == "Linear"
    assert not any(".base" in n for n in base.kinds)  # our wrappers' insides are not the base's
