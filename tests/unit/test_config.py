"""Flags, environment variables and validation of the server configuration."""

from __future__ import annotations

import pytest

from loramux.cli import build_parser
from loramux.config import ServerConfig


def test_env_variable_sets_a_flag_and_the_flag_wins(monkeypatch):
    monkeypatch.setenv("LORAMUX_MAX_QUEUE", "7")
    monkeypatch.setenv("LORAMUX_QUANTIZATION", "fp4")
    args = build_parser().parse_args(["serve", "--quantization", "int8"])
    assert args.max_queue == 7 and args.quantization == "int8"


@pytest.mark.parametrize("kwargs", [{"quantization": "q3"}, {"max_active_adapters": 0},
                                    {"default_max_new_tokens": 2000}, {"max_lora_rank": 0},
                                    {"cpu_4bit_kernel": "fast"}, {"host_memory": "hoard"}])
def test_invalid_config_refused(kwargs):
    with pytest.raises(ValueError):
        ServerConfig(**kwargs)
