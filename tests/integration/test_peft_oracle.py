"""Property, with PEFT as the oracle: for random adapter folders (PEFT-saved ones, ones written
from scratch, and random mutations of their configs and tensors), the server registers a
folder if and only if PEFT loads it with no missing or unexpected key (or refuses it with a
reason naming a feature it does not serve), and where both take it, their greedy answers are
the same tokens.

Bounded for CI (`LORAMUX_ORACLE_EXAMPLES`, default 25, derandomized); a longer run:
`LORAMUX_ORACLE_EXAMPLES=500 pytest tests/integration/test_peft_oracle.py` (~1 s an example).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from loramux.lora.peft_rules import UNSUPPORTED
from tests.adapters import make_adapter
from tests.reference import PeftLoader, greedy
from tests.server import ServerProcess

PROJ = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
        "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
LAYERS = 4  # the tiny model's decoder blocks
PREFIX = "base_model.model."
PROMPT, NEW_TOKENS = "Hello world", 8
EXAMPLES = int(os.environ.get("LORAMUX_ORACLE_EXAMPLES", "25"))
# No shrinking: an example costs a second, and the drawn start and mutations print as they are.
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
# PEFT-saved starting points: list targets, all seven with rsLoRA, an odd alpha.
GOOD = {"qv4": {"rank": 4, "targets": ("q_proj", "v_proj")},
        "all8rs": {"rank": 8, "targets": tuple(PROJ), "use_rslora": True},
        "mix2": {"rank": 2, "targets": ("k_proj", "o_proj", "down_proj"), "alpha": 3}}
OUTCOMES: Counter = Counter()


@dataclass
class Folder:
    """An adapter folder in memory: the config, the tensors by PEFT's key names, and how the
    keys and dtype are written (applied last, so that other mutations still find the keys)."""

    config: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    rename: str = ""  # "", "noprefix", "default", "other"
    dtype: torch.dtype | None = None

    def __repr__(self) -> str:
        return f"Folder({self.config}, {len(self.tensors)} tensors)"

    def modules(self) -> list[str]:
        return sorted({k.removeprefix(PREFIX).split(".lora_")[0] for k in self.tensors if ".lora_" in k})

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(json.dumps(self.config))
        rename = {"": lambda k: k, "noprefix": lambda k: k.removeprefix(PREFIX),
                  "default": lambda k: k.replace(".weight", ".default.weight"),
                  "other": lambda k: k.replace(".weight", ".other.weight")}[self.rename]
        tensors = {rename(k): v.to(self.dtype or v.dtype).contiguous() for k, v in self.tensors.items()}
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        return folder


def full_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.{PROJ[proj]}.{proj}"


@pytest.fixture(scope="module")
def oracle(base_path):
    return PeftLoader(base_path)


@pytest.fixture(scope="module")
def shapes(oracle) -> dict[str, tuple[int, int]]:
    return {p: (m.in_features, m.out_features) for p in PROJ
            for m in [oracle.base.get_submodule(full_name(0, p))]}


@pytest.fixture(scope="module")
def good(tmp_path_factory, base_path) -> dict[str, Folder]:
    root = tmp_path_factory.mktemp("oracle-good")
    out = {}
    for i, (name, spec) in enumerate(GOOD.items()):
        folder = make_adapter(base_path, root / name, seed=100 + i, **spec)
        out[name] = Folder(json.loads((folder / "adapter_config.json").read_text()),
                           load_file(str(folder / "adapter_model.safetensors")))
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("oracle")
    srv = ServerProcess(work, "--adapter-dir", str(work / "adapters"), "--adapter-scan-interval", "0",
                        "--max-lora-rank", "16")
    srv.work = work
    yield srv
    srv.stop()


# --- starting points ---------------------------------------------------------------------

def lora_pair(shape: tuple[int, int], rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rank, shape[0], generator=gen) * 0.1, torch.randn(shape[1], rank, generator=gen) * 0.1)


@st.composite
def scratch(draw, shapes) -> Folder:
    """A folder written by hand in PEFT's format: targets as a list, full names or a regex,
    some layers only, per-projection ranks through rank_pattern, alpha_pattern, rsLoRA."""
    projs = draw(st.lists(st.sampled_from(sorted(PROJ)), min_size=1, max_size=4, unique=True))
    layers = draw(st.sampled_from([list(range(LAYERS)), [0], [1, 3]]))
    rank = draw(st.sampled_from([1, 2, 4, 8]))
    ranks = {p: draw(st.sampled_from([rank, rank, 3])) for p in projs}
    form = draw(st.sampled_from(["list", "full", "regex"]))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
              "lora_alpha": draw(st.sampled_from([1, 4, 16, 0.5])), "use_rslora": draw(st.booleans()),
              "rank_pattern": {p: r for p, r in ranks.items() if r != rank},
              "alpha_pattern": draw(st.sampled_from([{}, {projs[0]: 2}]))}
    if form == "list":
        config["target_modules"] = projs
        if layers != list(range(LAYERS)):
            config["layers_to_transform"] = layers
    elif form == "full":
        config["target_modules"] = [full_name(layer, p) for layer in layers for p in projs]
    else:
        config["target_modules"] = rf".*\.layers\.({'|'.join(map(str, layers))})\..*\.({'|'.join(projs)})"
    folder = Folder(config)
    for layer in layers:
        for p in projs:
            a, b = lora_pair(shapes[p], ranks[p], seed=10 * layer + sorted(PROJ).index(p))
            folder.tensors[f"{PREFIX}{full_name(layer, p)}.lora_A.weight"] = a
            folder.tensors[f"{PREFIX}{full_name(layer, p)}.lora_B.weight"] = b
    return folder


# --- mutations: each (name, parameter) changes the config, the tensors, or both ----------

def module_rank(folder: Folder, module: str) -> int:
    return folder.tensors[f"{PREFIX}{module}.lora_A.weight"].shape[0]


def projs_of(folder: Folder) -> list[str]:
    return sorted({m.rsplit(".", 1)[-1] for m in folder.modules()})


def mutate_config(folder: Folder, shapes, what: str, value) -> None:
    """A field set to `value` (`...`: removed), whatever the tensors say."""
    if value is ...:
        folder.config.pop(what, None)
    else:
        folder.config[what] = value


def mutate_r(folder: Folder, shapes, how: str) -> None:
    r = module_rank(folder, folder.modules()[0])
    folder.config["r"] = {"double": 2 * r, "minus": r - 1, "float": float(r), "str": str(r), "zero": 0}[how]
    folder.config.pop("rank_pattern", None)


def mutate_rank(folder: Folder, shapes, proj_index: int, rank: int, with_pattern: bool) -> None:
    """Cut one projection's tensors to `rank`; with_pattern says so in rank_pattern too."""
    proj = projs_of(folder)[proj_index % len(projs_of(folder))]
    for module in folder.modules():
        if module.endswith(proj):
            a, b = f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"
            k = min(rank, folder.tensors[a].shape[0])
            folder.tensors[a], folder.tensors[b] = folder.tensors[a][:k], folder.tensors[b][:, :k]
    if with_pattern:
        folder.config.setdefault("rank_pattern", {})[proj] = min(rank, module_rank(folder, module))


def mutate_targets(folder: Folder, shapes, how: str) -> None:
    projs, modules = projs_of(folder), folder.modules()
    targets = {"drop": projs[1:] or ["q_proj"], "add": sorted(set(PROJ) - set(projs))[:1] + projs,
               "regex": rf".*\.({'|'.join(projs)})", "regex0": rf".*layers\.0\..*\.({'|'.join(projs)})",
               "full": modules, "all-linear": "all-linear", "lm_head": [*projs, "lm_head"],
               "x_proj": [*projs, "x_proj"], "only_x": ["x_proj"], "self_attn": [*projs, "self_attn"]}[how]
    folder.config["target_modules"] = targets


def mutate_layers(folder: Folder, shapes, layers, pattern, drop_tensors: bool) -> None:
    """layers_to_transform (and layers_pattern); drop_tensors keeps only those layers' tensors."""
    folder.config["layers_to_transform"] = layers
    if pattern is not None:
        folder.config["layers_pattern"] = pattern
    keep = {layers} if isinstance(layers, int) else set(layers)
    if drop_tensors and any(f"layers.{i}." in k for k in folder.tensors for i in keep):
        folder.tensors = {k: v for k, v in folder.tensors.items() if int(k.split("layers.")[1].split(".")[0]) in keep}


def mutate_exclude(folder: Folder, shapes, short: bool, drop_tensors: bool) -> None:
    module = folder.modules()[0]
    folder.config["exclude_modules"] = [module.rsplit(".", 1)[-1] if short else module]
    if drop_tensors and len(folder.modules()) > 1:
        folder.tensors = {k: v for k, v in folder.tensors.items() if not k.startswith(f"{PREFIX}{module}.")}


def mutate_tensors(folder: Folder, shapes, how: str, index: int) -> None:
    module = folder.modules()[index % len(folder.modules())]
    a, b = f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"
    if how == "drop":
        del folder.tensors[a], folder.tensors[b]
    elif how == "drop_b":
        del folder.tensors[b]
    elif how == "transpose":
        folder.tensors[a] = folder.tensors[a].T
    elif how == "extra":
        folder.tensors[f"{PREFIX}lm_head.weight"] = torch.zeros(3, 3)
    elif how == "add":  # the same projection in a layer that may not have it yet
        layer, proj = (int(module.split(".")[2]) + 1) % LAYERS, module.rsplit(".", 1)[-1]
        pa, pb = lora_pair(shapes[proj], module_rank(folder, module), seed=index)
        folder.tensors[f"{PREFIX}{full_name(layer, proj)}.lora_A.weight"] = pa
        folder.tensors[f"{PREFIX}{full_name(layer, proj)}.lora_B.weight"] = pb


def mutate_names(folder: Folder, shapes, how: str) -> None:
    folder.rename = how


def mutate_dtype(folder: Folder, shapes, dtype: torch.dtype) -> None:
    folder.dtype = dtype


MUTATIONS = {
    mutate_config: st.one_of(
        st.tuples(st.just("lora_alpha"), st.sampled_from([0, -4, 0.5, 3, 32])),
        st.tuples(st.just("alpha_pattern"), st.sampled_from([{"q_proj": 1}, {r"layers\.1\..*": 8}, {}])),
        st.tuples(st.just("rank_pattern"), st.sampled_from([{"q_proj": 2}, {"v_proj": 4}, {"x_proj": 1}])),
        st.tuples(st.just("use_rslora"), st.sampled_from([True, False, "false"])),
        st.tuples(st.just("target_modules"), st.just(...)),  # PEFT's default for Llama: q_proj, v_proj
        st.tuples(st.just("peft_type"), st.sampled_from([..., "lora", "IA3"])),
        st.tuples(st.sampled_from(["fan_in_fan_out", "use_dora", "lora_bias"]), st.just(True)),
        st.tuples(st.sampled_from(["bias", "init_lora_weights"]), st.sampled_from(["all", "gaussian", "pissa"])),
        st.tuples(st.sampled_from(["lora_dropout", "some_future_field"]), st.just(0.1)),
    ),
    mutate_r: st.tuples(st.sampled_from(["double", "minus", "float", "str", "zero"])),
    mutate_rank: st.tuples(st.integers(0, 6), st.sampled_from([1, 2, 3]), st.booleans()),
    mutate_targets: st.tuples(st.sampled_from(["drop", "add", "regex", "regex0", "full", "all-linear", "lm_head",
                                               "x_proj", "only_x", "self_attn"])),
    mutate_layers: st.tuples(st.sampled_from([[0], [1, 3], 2, list(range(LAYERS))]),
                             st.sampled_from([None, "layers", "h"]), st.booleans()),
    mutate_exclude: st.tuples(st.booleans(), st.booleans()),
    mutate_tensors: st.tuples(st.sampled_from(["drop", "drop_b", "transpose", "extra", "add"]), st.integers(0, 30)),
    mutate_names: st.tuples(st.sampled_from(["noprefix", "default", "other"])),
    mutate_dtype: st.tuples(st.sampled_from([torch.float16, torch.bfloat16])),
}
mutations = st.one_of([st.tuples(st.just(fn), params) for fn, params in MUTATIONS.items()])


# --- the property --------------------------------------------------------------------------

def loramux_verdict(server, adapter_id: str, folder: Path) -> tuple[grpc.StatusCode, str, list[int] | None]:
    with server.client() as c:
        try:
            c.register(adapter_id, str(folder))
        except grpc.RpcError as err:
            return err.code(), err.details(), None
        try:
            return grpc.StatusCode.OK, "", list(c.generate(PROMPT, adapter_id, max_new_tokens=NEW_TOKENS).token_ids)
        finally:
            c.unregister(adapter_id)


@SETTINGS
@given(data=st.data())
def test_loramux_takes_what_peft_takes(server, oracle, good, shapes, data):
    start = data.draw(st.sampled_from(sorted(good)) | st.just("scratch"), label="start")
    folder = data.draw(scratch(shapes), label="scratch") if start == "scratch" else Folder(
        json.loads(json.dumps(good[start].config)), dict(good[start].tensors))
    for fn, params in data.draw(st.lists(mutations, max_size=3), label="mutations"):
        if folder.modules():
            fn(folder, shapes, *params)
    n = sum(OUTCOMES.values())
    path = folder.write(server.work / "adapters" / f"case{n}")
    code, details, tokens = loramux_verdict(server, f"case{n}", path)
    model, why = oracle.load(path)
    shutil.rmtree(path)
    if code == grpc.StatusCode.OK:
        assert model is not None, f"loramux took a folder PEFT refuses ({why})"
        assert tokens == greedy(model, oracle.tokenizer, PROMPT, NEW_TOKENS), "greedy answers differ"
        OUTCOMES["both took it"] += 1
        return
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    if UNSUPPORTED in details:
        OUTCOMES["loramux: not supported"] += 1
        return
    assert model is None, f"loramux refused a folder PEFT loads: {details}"
    OUTCOMES["both refused it"] += 1


def test_the_oracle_saw_both_outcomes():
    """The generator is worth its time only if it reaches both sides of the line."""
    print(f"PEFT oracle outcomes: {dict(OUTCOMES)}")
    if sum(OUTCOMES.values()) >= 20:
        assert OUTCOMES["both took it"] >= 3 and OUTCOMES["both refused it"] >= 3, OUTCOMES
