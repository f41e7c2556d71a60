"""What PEFT would build from an adapter's config on our base, so that registration can hold
the folder's tensors to it: which modules get a LoRA layer, and each one's rank and scaling.

PEFT's own functions are reused where they are pure (no pickle, no model, no hub): its config
parsing (`LoraConfig.from_peft_type`), module matching (`check_target_module_exists`) and
pattern lookup (`get_pattern_key`), so loramux reads a config exactly as the installed PEFT
does. What PEFT reads off the model itself (`all-linear`, the per-architecture default
targets) is mirrored by hand from `BaseModules`, a description of the base taken at start-up.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig
from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import get_pattern_key
from torch import nn

from loramux.errors import InvalidArgument

SERVED = "served"  # the kind of a layer loramux serves LoRA on (a linear layer of a decoder block)
UNSUPPORTED = "not supported by loramux"  # every refusal of a PEFT feature we do not serve says so

# Config fields read below against the tensors, or with no effect on a loaded adapter's
# forward on a linear layer; every other field must keep PEFT's default (`_refuse_variants`).
_CHECKED = {"r", "lora_alpha", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
            "rank_pattern", "alpha_pattern", "use_rslora", "bias", "init_lora_weights"}
_NO_EFFECT = {
    "peft_type", "task_type", "inference_mode", "base_model_name_or_path", "revision", "auto_mapping",
    "runtime_config", "lora_dropout",  # dropout is off at inference
    "fan_in_fan_out",  # PEFT resets it to False on nn.Linear, the only layers served
    "megatron_core", "qalora_group_size",  # read only with megatron_config / use_qalora
    "loftq_config", "eva_config", "corda_config", "lora_ga_config",  # initialisation only; weights are loaded
    "ensure_weight_tying",  # ties embedding/LM-head adapters, which are refused as targets anyway
}
_VARIANT_NAMES = {"use_dora": "DoRA (use_dora)", "modules_to_save": "modules_to_save (fully trained extra modules)",
                  "lora_bias": "lora_bias (a bias on lora_B)", "target_parameters": "target_parameters (LoRA on "
                  "nn.Parameters)", "trainable_token_indices": "trainable_token_indices",
                  "layer_replication": "layer_replication", "alora_invocation_tokens": "activated LoRA"}
# Initialisations whose layer creation only fills lora_A/lora_B, which loading then overwrites
# (LoraLayer.update_layer); the others (pissa, olora, corda, loftq, lora_ga, ...) rewrite the
# base weights as well, which a shared base cannot take.
_WEIGHT_ONLY_INITS = (True, False, "gaussian", "orthogonal", "eva")


@dataclass(frozen=True)
class BaseModules:
    """The base model as PEFT's matching sees it: every module name, in order, with its kind."""

    kinds: dict[str, str]  # module name -> SERVED, or the class name of a module we do not adapt
    linear: frozenset[str] = field(default_factory=frozenset)  # every linear layer, served or not
    output_name: str | None = None  # the LM head, which "all-linear" leaves out
    model_type: str | None = None  # picks PEFT's default target_modules when a config has none

    @classmethod
    def from_layers(cls, names: Iterable[str]) -> BaseModules:
        """Only the served layers known (no model at hand: unit tests, benchmarks)."""
        names = list(names)
        return cls(dict.fromkeys(names, SERVED), frozenset(names))


def describe_base(model: nn.Module, served: Iterable[str]) -> BaseModules:
    """Describe `model` (its served layers already wrapped) as PEFT sees the unwrapped one."""
    served = set(served)
    kinds, linear = {}, set()
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{s}.") for s in served):
            continue  # PEFT skips the root; a wrapper's insides are ours, not the base's
        kinds[name] = SERVED if name in served else type(module).__name__
        if name in served or isinstance(module, nn.Linear):  # bitsandbytes' 4/8-bit layers subclass it
            linear.add(name)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output = next((n for n, m in model.named_modules() if head is not None and m is head), None)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return BaseModules(kinds, frozenset(linear), output, model_type)


def parse_config(raw: dict, path: Path) -> LoraConfig:
    """PEFT's own reading of adapter_config.json (PeftConfig.from_pretrained without the hub),
    then a refusal of every LoRA variant whose forward loramux does not compute."""
    raw = {k: v for k, v in raw.items() if k != "runtime_config"}  # PEFT drops it too (from_json_file)
    try:
        config = LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**raw))
    except Exception as exc:  # PEFT's own validation: any error it raises is the config's fault
        raise InvalidArgument(f"{path}: PEFT refuses this config: {_said(exc)}") from None
    _refuse_variants(config, path)
    return config


@functools.cache
def _defaults() -> LoraConfig:
    return LoraConfig()


def _refuse_variants(config: LoraConfig, path: Path) -> None:
    for f in dataclasses.fields(LoraConfig):
        name = f.name
        if name in _CHECKED or name in _NO_EFFECT:
            continue
        value, default = getattr(config, name), getattr(_defaults(), name)
        if value != default and (value or default):  # an empty list means unset, as PEFT tests it
            what = _VARIANT_NAMES.get(name, f"{name}={short(value)}")
            raise InvalidArgument(f"{path}: {what} is {UNSUPPORTED}: it changes the forward that loramux computes")
    if config.bias not in ("none", "all", "lora_only"):
        raise InvalidArgument(f"{path}: bias={short(config.bias)}: PEFT knows 'none', 'all' and 'lora_only'")
    if config.init_lora_weights not in _WEIGHT_ONLY_INITS:
        raise InvalidArgument(
            f"{path}: init_lora_weights={short(config.init_lora_weights)} is {UNSUPPORTED}: loading it makes PEFT "
            "rewrite the base weights; save the adapter converted to plain LoRA"
        )


def targeted_modules(config: LoraConfig, base: BaseModules, path: Path) -> list[str]:
    """The base modules PEFT puts a LoRA layer on (BaseTuner.inject_adapter), in its order."""
    config = _expand_targets(config, base, path)
    try:
        hits = [name for name in base.kinds if _matches(config, name)]
    except Exception as exc:  # only PEFT's matching runs here: what it raises, it raises on this config
        raise InvalidArgument(f"{path}: PEFT cannot match target_modules with this config: {_said(exc)}") from None
    if not hits:
        raise InvalidArgument(
            f"{path}: target_modules={short(config.target_modules)} (layers_to_transform="
            f"{short(config.layers_to_transform)}, layers_pattern={short(config.layers_pattern)}, exclude_modules="
            f"{short(config.exclude_modules)}) selects no module of the base model; PEFT refuses it too"
        )
    return hits


def _matches(config: LoraConfig, name: str) -> bool:
    hit = check_target_module_exists(config, name)
    return bool(hit) and not isinstance(hit, _ExcludedModule)


def _expand_targets(config: LoraConfig, base: BaseModules, path: Path) -> LoraConfig:
    """PEFT's two model-dependent rewrites of target_modules, by hand: the default targets of
    the architecture when none are set (LoraModel._prepare_adapter_config), and "all-linear"
    as every linear layer but the output head (tuners_utils._maybe_include_all_linear_layers)."""
    targets = config.target_modules
    if targets is None:
        default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(base.model_type or "")
        if default is None:
            raise InvalidArgument(f"{path}: target_modules is not set and PEFT has no default for this base "
                                  f"({base.model_type}); set target_modules")
        targets = default if isinstance(default, str) else set(default)
    elif isinstance(targets, str) and targets.lower() == "all-linear":
        targets = set(base.linear) - {base.output_name}
    elif not isinstance(targets, (str, list, set, tuple)):
        raise InvalidArgument(f"{path}: target_modules={short(targets)} must be a list of names or a regex string")
    if targets is config.target_modules:
        return config
    config = copy.copy(config)
    config.target_modules = targets
    return config


def module_rank(config: LoraConfig, module: str, a: list[int], b: list[int], path: Path) -> int:
    """The rank PEFT gives `module` (LoraModel._create_and_replace: rank_pattern, else r), held
    to the tensors: PEFT refuses a lora_A [r, in] / lora_B [out, r] of another size."""
    patterns = _patterns(config, "rank_pattern", path)
    key = get_pattern_key(patterns.keys(), module)
    what = f"rank_pattern[{key!r}]" if key in patterns else "r"
    r = patterns.get(key, config.r)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise InvalidArgument(f"{path}: {what}={short(r)} for {module}: PEFT needs a positive integer rank")
    if a[0] != r or b[1] != r:
        raise InvalidArgument(
            f"{path}: {what}={r} for {module}, but its tensors hold lora_A {a} and lora_B {b} (rank "
            f"{a[0] if a[0] == b[1] else f'{a[0]} / {b[1]}'}); PEFT refuses the size mismatch"
        )
    return r


def module_scaling(config: LoraConfig, module: str, rank: int, path: Path) -> float:
    """PEFT's scaling of `module` (LoraLayer.update_layer): alpha_pattern, else lora_alpha, over
    r, or over sqrt(r) when use_rslora is truthy, as PEFT tests it."""
    patterns = _patterns(config, "alpha_pattern", path)
    key = get_pattern_key(patterns.keys(), module)
    what = f"alpha_pattern[{key!r}]" if key in patterns else "lora_alpha"
    alpha = patterns.get(key, config.lora_alpha)
    check_alpha(alpha, f"{what} for {module}", path)
    return float(alpha) / (math.sqrt(rank) if config.use_rslora else rank)


def check_alpha(alpha: object, what: str, path: Path) -> float:
    # PEFT would take NaN or infinity and answer NaN; no served row should.
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InvalidArgument(f"{path}: {what}={short(alpha)} must be a finite number")
    return float(alpha)


def _patterns(config: LoraConfig, name: str, path: Path) -> dict:
    patterns = getattr(config, name)
    if not isinstance(patterns, dict):
        raise InvalidArgument(f"{path}: {name}={short(patterns)} must be an object of pattern -> value")
    for key in patterns:
        try:
            re.compile(key)
        except re.error as exc:
            raise InvalidArgument(f"{path}: {name} key {key!r} is not a valid regex ({exc})") from None
    return patterns


def short(value: object, limit: int = 120) -> str:
    text = repr(sorted(value, key=str) if isinstance(value, set) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _said(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text if len(text) <= 300 else text[:297] + '...'}"
