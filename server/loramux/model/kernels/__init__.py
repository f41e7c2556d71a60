"""loramux's CPU kernels: built once per torch version and source, cached, and loaded as
the ops `torch.ops.loramux.linear_4bit` (the fused 4-bit product), `lora_rows` (a decode
step's LoRA term), `linear_4bit_lora` (both in one call), their AVX2 forms over the
panels' layout (`panels_4bit`, `linear_4bit_panels[_lora]`, `dequantize_panels`;
`linear_4bit.cpp`), `decode_attention` (a decode step's attention; `attention.cpp`) and
`rms_norm` (Llama's RMSNorm in one call; `norm.cpp`).

Built with the system's C++ compiler against the installed torch (about 30 s on 2 cores),
into the loramux cache (`LORAMUX_CACHE`, else `~/.cache/loramux`), under a name that
hashes the source, torch's version and the flags: a new torch or a changed kernel builds
again, the same ones never do. The build writes a temporary file renamed into place when
complete, so concurrent servers or an interrupted build never load half a library (and
nothing waits on a lock file a killed build left behind, as torch's own JIT loader can).
Where there is no compiler or no AVX2, `load` returns False and the caller keeps
bitsandbytes' dequantize-then-matmul.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from loramux.model.cache import default_cache_dir

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
SOURCES = (_HERE / "linear_4bit.cpp", _HERE / "attention.cpp", _HERE / "norm.cpp")
HEADERS = (_HERE / "common.h",)
_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fopenmp", "-DNDEBUG"]


def isa() -> str | None:
    """Which build of the loops this CPU runs: "avx512", "avx2", or None (neither)."""
    capability = torch.backends.cpu.get_cpu_capability()  # honours ATEN_CPU_CAPABILITY
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(capability)


def _openmp_runtime() -> str:
    """The OpenMP runtime to link: the one torch's wheel bundles if it does (with -fopenmp
    the linker would take the system's; a second runtime in the process is a second thread
    team, `model.threads`)."""
    bundled = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    return str(bundled[0]) if bundled else "-lgomp"


def _commands(tmp: Path, out: Path) -> list[list[str]]:
    """Compile each source, then link (two steps, so that -fopenmp does not choose the runtime)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    cxx, abi = os.environ.get("CXX", "c++"), int(torch._C._GLIBCXX_USE_CXX11_ABI)
    objs = [tmp / source.with_suffix(".o").name for source in SOURCES]
    compiles = [[cxx, "-c", *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in include_paths()),
                 f"-I{sysconfig.get_paths()['include']}", str(source), "-o", str(obj)]
                for source, obj in zip(SOURCES, objs, strict=True)]
    libs = library_paths()
    link = [cxx, "-shared", *map(str, objs), "-o", str(out), *(f"-L{p}" for p in libs),
            *(f"-Wl,-rpath,{p}" for p in libs), "-lc10", "-ltorch_cpu", "-ltorch", _openmp_runtime()]
    return [*compiles, link]


def library_path() -> Path:
    """Where the built kernel for this torch and source lives."""
    code = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    digest = hashlib.sha256(code + torch.__version__.encode() + " ".join(_FLAGS).encode())
    return default_cache_dir().parent / "kernels" / f"loramux_kernels-{digest.hexdigest()[:16]}.so"


def build() -> Path:
    """The kernel's shared library, compiled first unless already cached."""
    target = library_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("building loramux's CPU kernels once (about 30 s) into %s", target.parent)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".loramux_kernels-", dir=target.parent))
    try:
        out = tmp / target.name
        for command in _commands(tmp, out):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"building the CPU kernels failed:\n{done.stderr[-2000:]}")
        os.replace(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("CPU kernels built in %.0f s", time.perf_counter() - started)
    return target


@functools.cache
def load() -> bool:
    """Make the `torch.ops.loramux` kernels available; False (logged once) where they cannot be."""
    if isa() is None:
        log.info("no AVX2 on this CPU: 4-bit layers dequantize then matmul")
        return False
    try:
        torch.ops.load_library(str(build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("loramux's CPU kernels unavailable: 4-bit layers dequantize then matmul, attention and the "
                    "LoRA term run torch's ops: %s", exc)
        return False
    return True
