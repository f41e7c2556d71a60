"""Adapter file checks that need no model: safetensors headers, configs, pickles."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from loramux.errors import InvalidArgument
from loramux.lora import files


def write_header(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_valid_header(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"x.lora_A.weight": torch.zeros(2, 3)}, str(path))
    assert files.read_safetensors_header(path, 1 << 20) == {"x.lora_A.weight": ("F32", [2, 3])}


@pytest.mark.parametrize("header", [
    {"t": {"dtype": "F32", "shape": [1 << 40, 1 << 20], "data_offsets": [0, 16]}},  # absurd shape
    {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 1 << 50]}},  # offset past the end
    {"t": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}},  # dtype we do not take
    {"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
    {"t": "not a dict"},
])
def test_bad_headers_refused_without_allocating(tmp_path, header):
    path = tmp_path / "a.safetensors"
    write_header(path, header, b"\0" * 16)
    with pytest.raises(InvalidArgument):
        files.read_safetensors_header(path, 1 << 20)


def test_header_length_claims_more_than_the_file(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(InvalidArgument, match="corrupt"):
        files.read_safetensors_header(path, 1 << 20)


def test_size_limit(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"x": torch.zeros(100)}, str(path))
    with pytest.raises(InvalidArgument, match="max-adapter-bytes"):
        files.read_safetensors_header(path, 100)


def test_pickled_weights_refused(tmp_path):
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(InvalidArgument, match="pickle"):
        files.weights_path(tmp_path)


@pytest.mark.parametrize("config,match", [
    ("[1, 2]", "object"), ("{", "JSON"), ('{"peft_type": "IA3"}', "LORA"), ('{"r": 8}', "peft_type is missing"),
    ('{"peft_type": "lora"}', "'lora'"),
])
def test_bad_configs(tmp_path, config, match):
    (tmp_path / "adapter_config.json").write_text(config)
    with pytest.raises(InvalidArgument, match=match):
        files.read_config(tmp_path)


def test_tensor_names_grouped_and_checked(tmp_path):
    names = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert files.group_by_module(names, tmp_path) == {
        "model.layers.0.self_attn.q_proj": {"A": names[0], "B": names[1]}}
    with pytest.raises(InvalidArgument, match="without its pair"):
        files.group_by_module(names[:1], tmp_path)
    with pytest.raises(InvalidArgument, match="unsupported"):
        files.group_by_module(["base_model.model.lm_head.weight"], tmp_path)
    with pytest.raises(InvalidArgument, match="unsupported"):  # PEFT would not load it: no prefix
        files.group_by_module([n.removeprefix("base_model.model.") for n in names], tmp_path)
    with pytest.raises(InvalidArgument, match="two lora_A"):
        files.group_by_module([*names, names[0].replace("lora_A.", "lora_A.default.")], tmp_path)
