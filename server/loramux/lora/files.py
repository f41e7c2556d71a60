"""Reading PEFT adapter folders safely: config, safetensors header, tensor names.

Nothing here unpickles: `.bin` weights are refused, and the safetensors header is read and
bounded by hand before any tensor is allocated, so a file that claims absurd sizes or
offsets is refused cheaply.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

from loramux.errors import InvalidArgument

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_HEADER_BYTES = 16 << 20
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
# The names PEFT saves (`base_model.model.<module>.lora_A.weight`), and the same with the
# adapter name `default` left in, which PeftModel.from_pretrained loads too (its default
# adapter name makes the key its own). Any other name is a key PEFT would not load.
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


def read_config(folder: Path) -> dict:
    """Parse adapter_config.json into a dict; raise InvalidArgument saying what to fix.
    Its fields are read as PEFT reads them in `peft_rules`."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise InvalidArgument(f"{folder}: missing {CONFIG_FILE} (a PEFT adapter folder needs it)")
    try:
        config = json.loads(path.read_bytes()[: 1 << 20])
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidArgument(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidArgument(f"{path}: expected a JSON object")
    # PEFT picks the config class by this exact string (PEFT_TYPE_TO_CONFIG_MAPPING) and
    # refuses a folder without it.
    if config.get("peft_type") != "LORA":
        got = repr(config["peft_type"])[:40] if "peft_type" in config else "missing"
        raise InvalidArgument(f"{path}: peft_type is {got}; only \"LORA\" adapters are served")
    return config


def read_safetensors_header(path: Path, max_bytes: int) -> dict[str, tuple[str, list[int]]]:
    """Return {name: (dtype, shape)} after checking sizes and offsets against the file."""
    size = path.stat().st_size
    if size > max_bytes:
        raise InvalidArgument(f"{path}: {size} bytes exceeds --max-adapter-bytes ({max_bytes})")
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InvalidArgument(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise InvalidArgument(f"{path}: safetensors header claims {n} bytes; file is corrupt")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise InvalidArgument(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise InvalidArgument(f"{path}: safetensors header is not an object")
    header.pop("__metadata__", None)
    data_len, out = size - 8 - n, {}
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (dtype in DTYPE_BYTES and all(isinstance(d, int) and d >= 0 for d in shape)
                  and 0 <= start <= end <= data_len
                  and end - start == DTYPE_BYTES[dtype] * math.prod(shape))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise InvalidArgument(
                f"{path}: tensor {name!r} has a bad dtype, shape or offsets; the file is corrupt or truncated"
            )
        out[name] = (dtype, list(shape))
    return out


def weights_path(folder: Path) -> Path:
    """The safetensors file of an adapter folder; refuse pickled weights with a reason."""
    path = folder / WEIGHTS_FILE
    if path.is_file():
        return path
    pickled = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise InvalidArgument(
            f"{folder}: found {pickled[0]} but no {WEIGHTS_FILE}; pickled weights can run code "
            "and are refused. Convert with PEFT: save_pretrained(..., safe_serialization=True)"
        )
    raise InvalidArgument(f"{folder}: missing {WEIGHTS_FILE}")


def group_by_module(names: list[str], path: Path) -> dict[str, dict[str, str]]:
    """Map tensor names to {module: {"A": name, "B": name}}; refuse anything else."""
    modules: dict[str, dict[str, str]] = {}
    for name in names:
        m = _KEY.match(name)
        if not m:
            raise InvalidArgument(
                f"{path}: unsupported tensor {name[:200]!r}: loramux serves only PEFT's "
                "base_model.model.<module>.lora_A.weight / lora_B.weight"
            )
        pair = modules.setdefault(m["module"], {})
        if m["ab"] in pair:
            raise InvalidArgument(f"{path}: {m['module']} has two lora_{m['ab']} tensors")
        pair[m["ab"]] = name
    for module, pair in modules.items():
        if set(pair) != {"A", "B"}:
            raise InvalidArgument(f"{path}: module {module} has lora_{set(pair).pop()} without its pair")
    if not modules:
        raise InvalidArgument(f"{path}: no LoRA tensors found")
    return modules
