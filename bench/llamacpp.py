"""llama.cpp's own server for benchmarks: built once from source, the model's GGUF, LoRA GGUFs.

Everything is cached under `<cache>/bench/llamacpp/` (cache: `bench.common.cache_root()`):

- the llama.cpp source vendored in the `llama-cpp-python` sdist (pinned: `VERSION`),
  fetched with `pip download --no-binary :all:` (the package registry is the only source this
  project reaches) and extracted there;
- `build/bin/llama-server`, configured with `CMAKE_FLAGS` (no curl, no OpenSSL, no web UI, no
  tests or examples) and built for this CPU (`-march=native`, llama.cpp's default): ~12 min
  on 2 cores, logged to `build-cmake.log` and `build.log`, skipped when the binary exists
  (`--llama-build avx2`: `build-avx2/`, the instruction sets named instead of -march=native);
- `models/`: the GGUF file the loramux server's model is converted from (the same file, the
  same SHA-256, taken out of the same wheel by `loramux.model.gguf`);
- each PEFT adapter as a LoRA GGUF next to its folder (`<adapter>.<outtype>.gguf`), made by
  the vendored `convert_lora_to_gguf.py` with the vendored `gguf-py`.

`LlamaServer` runs one `llama-server` subprocess on a loopback port, `run_http_load` is a
closed-loop streaming HTTP driver giving the same `LoadResult` as `common.run_load`.

    python -m bench.llamacpp          # build (or find) llama-server and print its path
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as c  # noqa: E402

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"  # its vendor/llama.cpp is what gets built; a new pin means a new build
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF",
)
# Builds: `native` is llama.cpp's default (-march=native); `avx2` names the instruction sets
# instead, for CPUs whose CPUID lists more than the VM runs (AMX here: see start_server).
BUILDS = {
    "native": (),
    "avx2": ("-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
             "-DGGML_BMI2=ON"),
}
_PERCENT = re.compile(r"^\[\s*(\d+)%\]")


# --- locations -------------------------------------------------------------------------
def root() -> Path:
    path = c.cache_root() / "bench" / "llamacpp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sdist_dir() -> Path:
    return root() / f"{PACKAGE.replace('-', '_')}-{VERSION}"


def source_dir() -> Path:
    """The llama.cpp tree vendored in the sdist."""
    return sdist_dir() / "vendor" / "llama.cpp"


def build_dir(build: str = "native") -> Path:
    return root() / ("build" if build == "native" else f"build-{build}")


def server_binary(build: str = "native") -> Path:
    return build_dir(build) / "bin" / "llama-server"


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """One process at a time builds or fetches (another bench started meanwhile waits)."""
    with (root() / f".{name}.lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- source and build ------------------------------------------------------------------
def ensure_source(log: Callable[[str], None] = print) -> Path:
    """The vendored llama.cpp source: `pip download` the pinned sdist once, extract it."""
    if (source_dir() / "CMakeLists.txt").is_file():
        return source_dir()
    with _lock("source"):
        if (source_dir() / "CMakeLists.txt").is_file():
            return source_dir()
        tarball = root() / f"{sdist_dir().name}.tar.gz"
        if not tarball.is_file():
            log(f"llama.cpp: downloading the {PACKAGE}=={VERSION} sdist (its vendored source) into {root()}")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                   "--disable-pip-version-check", "-d", str(root()), f"{PACKAGE}=={VERSION}"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0 or not tarball.is_file():
                raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{done.stderr.strip()}")
        log(f"llama.cpp: extracting {tarball.name}")
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root()))
        try:
            with tarfile.open(tarball) as tar:
                tar.extractall(tmp, filter="data")
            shutil.rmtree(sdist_dir(), ignore_errors=True)
            os.replace(tmp / sdist_dir().name, sdist_dir())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return source_dir()


def ensure_server(jobs: int | None = None, log: Callable[[str], None] = print, build: str = "native") -> Path:
    """`llama-server` of one of `BUILDS`, configured and built once (~12 min on 2 cores); its path."""
    if server_binary(build).is_file():
        return server_binary(build)
    source = ensure_source(log)
    if shutil.which("cmake") is None:
        raise RuntimeError("building llama-server needs cmake and a C++ compiler (apt-get install cmake g++, "
                           "or .venv/bin/pip install cmake)")
    out, logs = build_dir(build), root() / f"{build_dir(build).name}.log"
    with _lock("build"):
        if server_binary(build).is_file():
            return server_binary(build)
        jobs = jobs or os.cpu_count() or 1
        log(f"llama.cpp: configuring {source} -> {out} ({build})")
        _run_logged(["cmake", "-S", str(source), "-B", str(out), *CMAKE_FLAGS, *BUILDS[build]],
                    root() / f"{out.name}-cmake.log")
        log(f"llama.cpp: building llama-server with {jobs} jobs, ~12 min on 2 cores, once (log: {logs})")
        _run_logged(["cmake", "--build", str(out), "--target", "llama-server", "-j", str(jobs)], logs, progress=log)
    if not server_binary(build).is_file():
        raise RuntimeError(f"the build finished without {server_binary(build)}; see {logs}")
    return server_binary(build)


def _run_logged(cmd: list[str], log_path: Path, progress: Callable[[str], None] | None = None) -> None:
    """Run `cmd` with its output in `log_path`; report make's percentage every 10% or minute."""
    started = last_time = time.monotonic()
    last = -100
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log_file.write(line)
            log_file.flush()
            m = _PERCENT.match(line)
            if progress and m and (int(m[1]) >= last + 10 or time.monotonic() - last_time > 60):
                last, last_time = int(m[1]), time.monotonic()
                progress(f"  llama-server build: {last}% ({last_time - started:.0f} s)")
        if proc.wait() != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); see {log_path}")


# --- model and adapters ----------------------------------------------------------------
def ensure_model_gguf(name: str = "smollm2-135m-instruct") -> Path:
    """The GGUF file that loramux's named model is built from: the same wheel, the same
    SHA-256 check (`loramux.model.gguf`), extracted once into `models/`."""
    from loramux.model.cache import default_cache_dir
    from loramux.model.gguf import gguf_file

    return gguf_file(name, root() / "models", default_cache_dir())  # the wheel where loramux keeps it


def convert_adapter(folder: Path, base: Path, outtype: str = "f32") -> Path:
    """A PEFT adapter folder as a LoRA GGUF next to it (`<folder>.<outtype>.gguf`), converted
    once by the vendored `convert_lora_to_gguf.py` against the HF base folder `base` (its
    config only). Made again when the adapter's weights are newer than the file."""
    out = folder.parent / f"{folder.name}.{outtype}.gguf"
    weights = folder / "adapter_model.safetensors"
    if out.is_file() and out.stat().st_mtime >= weights.stat().st_mtime:
        return out
    source = ensure_source()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(source / "gguf-py"), str(source), os.environ.get("PYTHONPATH")) if p)}
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    cmd = [sys.executable, str(source / "convert_lora_to_gguf.py"), "--base", str(base), "--outtype", outtype,
           "--outfile", str(tmp), str(folder)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0 or not tmp.is_file():
            raise RuntimeError(f"converting {folder} to GGUF failed:\n{done.stderr.strip()[-3000:]}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


# --- the server --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """One `llama-server` on a loopback port: the model, LoRA files loaded at scale 0 (each
    request chooses its own), `--metrics` on. Its subprocess is stopped as the tests'
    `ServerProcess` stops loramux's (SIGTERM, then kill)."""

    def __init__(self, binary: Path, model: Path, workdir: Path, loras: Sequence[Path] = (), threads: int = 0,
                 parallel: int = 32, ctx_per_slot: int = 512, extra: Sequence[str] = (),
                 timeout: float = 180) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = workdir / f"llama-server-{time.monotonic_ns()}.log"
        threads = threads or os.cpu_count() or 1
        if any("," in str(path) for path in loras):
            raise ValueError(f"llama-server takes LoRA paths comma-separated; these contain commas: {loras}")
        lora_args = ["--lora", ",".join(map(str, loras)), "--lora-init-without-apply"] if loras else []
        self.cmd = [
            str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
            "-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-c", str(parallel * ctx_per_slot),
            "--cont-batching", "--no-cache-prompt", "--cache-ram", "0", "--metrics", "--no-webui",
            *lora_args, *extra,
        ]
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir)
        self.address = f"127.0.0.1:{self.port}"
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None or time.monotonic() > end:
                exc = RuntimeError(f"llama-server did not start (exit {self.proc.returncode}; {' '.join(self.cmd)}):"
                                   f"\n{self.log()[-4000:]}")
                exc.returncode = self.proc.returncode  # type: ignore[attr-defined]
                raise exc
            with contextlib.suppress(OSError, http.client.HTTPException):
                if self.get("/health")[0] == 200:
                    return
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        from tests.server import ServerProcess  # imported late: loramux must not load before a --snapshot

        return ServerProcess.stop(self, timeout=timeout)  # uses .proc and ._log, as ours

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def get(self, path: str) -> tuple[int, str]:
        return self.request("GET", path)

    def post_json(self, path: str, body: dict):
        status, text = self.request("POST", path, body)
        if status != 200:
            raise RuntimeError(f"POST {path}: HTTP {status}: {text[:500]}")
        return json.loads(text)

    def lora_adapters(self) -> list[dict]:
        status, text = self.get("/lora-adapters")
        if status != 200:
            raise RuntimeError(f"GET /lora-adapters: HTTP {status}: {text[:500]}")
        return json.loads(text)

    def tokenize(self, text: str) -> list[int]:
        """The ids /completion evaluates for a string prompt: special tokens parsed, BOS
        added only where the model's `tokenizer.ggml.add_bos_token` says so."""
        return self.post_json("/tokenize", {"content": text, "add_special": True, "parse_special": True})["tokens"]

    def metrics(self) -> dict[str, float]:
        """The Prometheus counters of `--metrics` ({"llamacpp:n_decode_total": ...})."""
        status, text = self.get("/metrics")
        out: dict[str, float] = {}
        for line in text.splitlines() if status == 200 else ():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out



def start_server(binary: Path, model: Path, workdir: Path, log: Callable[[str], None] = print,
                 **kwargs) -> LlamaServer:
    """A `LlamaServer`; started again with `--no-repack` where its first forward dies of an
    illegal instruction. This VM's CPUID lists AMX, the `-march=native` build compiles ggml's
    AMX kernels in, and their first tile instruction (`tilezero`) traps: SIGILL at warm-up.
    `--no-repack` turns off ggml's extra CPU buffer types, AMX among them; the other one
    (repacked layouts for AVX) has no Q4_1 layout, so this model's matmuls run as before."""
    extra = list(kwargs.pop("extra", ()))
    if _NO_REPACK and "--no-repack" not in extra:  # learnt by an earlier start of this process
        extra.append("--no-repack")
    try:
        return LlamaServer(binary, model, workdir, extra=extra, **kwargs)
    except RuntimeError as exc:
        if "--no-repack" in extra or getattr(exc, "returncode", None) != -signal.SIGILL:
            raise
    log("  llama-server died of SIGILL (ggml's AMX kernels on a CPU that does not run them): again with --no-repack")
    _NO_REPACK.append(True)
    return LlamaServer(binary, model, workdir, extra=[*extra, "--no-repack"], **kwargs)


_NO_REPACK: list[bool] = []  # non-empty once a start died of SIGILL and --no-repack fixed it


def completion_body(req: c.BenchRequest, lora: list[dict] | None = None) -> dict:
    """A /completion request doing what loramux does for `req`: the prompt string verbatim,
    greedy (temperature 0, the temperature sampler alone: no repeat penalty, no top-k/p),
    exactly max_new_tokens when ignore_eos, no prompt reuse, streamed with token ids.
    `lora`: [{"id": i, "scale": s}] (absent: every adapter at its start scale, 0 here)."""
    body = {"prompt": req.prompt, "n_predict": req.max_new_tokens, "temperature": 0.0, "samplers": ["temperature"],
            "repeat_penalty": 1.0, "ignore_eos": req.ignore_eos, "cache_prompt": False, "stream": True,
            "return_tokens": True}
    if lora:
        body["lora"] = lora
    return body


# --- the load driver ---------------------------------------------------------------------
@dataclass
class HttpOutcome(c.Outcome):
    prompt_n: int = -1  # prompt tokens llama-server evaluated (its final `timings.prompt_n`)


def stream_one(port: int, body: dict, index: int, adapter_id: str, t0: float, timeout: float = 600) -> HttpOutcome:
    """POST one streamed /completion on a connection of its own; the time of every token.
    (llama-server closes kept-alive connections after a streamed answer, sometimes after the
    client has sent its next request on it: one connection per request, ~0.1 ms on loopback.)"""
    out = HttpOutcome(index, adapter_id, time.perf_counter() - t0)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/completion", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            out.error = f"HTTP {resp.status}: {resp.read().decode(errors='replace')[:300]}"
            return out
        while line := resp.readline():
            if line.startswith(b"error:"):
                out.error = line.decode(errors="replace").strip()
            if not line.startswith(b"data: "):
                continue  # blank separators, ": ping" comments
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out.error = json.dumps(chunk["error"])[:300]
            ids = chunk.get("tokens") or []
            if ids:
                now = time.perf_counter() - t0
                out.token_ids.extend(ids)
                out.token_times.extend([now] * len(ids))
            if chunk.get("stop"):
                out.prompt_n = int(chunk.get("timings", {}).get("prompt_n", chunk.get("tokens_evaluated", -1)))
    except (OSError, http.client.HTTPException, ValueError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return out


def run_http_load(server: LlamaServer, requests: list[c.BenchRequest], concurrency: int,
                  body_of: Callable[[c.BenchRequest], dict], timeout: float = 600,
                  on_drained: Callable[[], None] | None = None) -> c.LoadResult:
    """`common.run_load` for llama-server: `concurrency` client threads, closed loop (take the
    next request, stream it, time its tokens); `on_drained` as there."""
    pending = iter(range(len(requests)))
    take = threading.Lock()
    done: list[HttpOutcome | None] = [None] * len(requests)
    go = threading.Barrier(concurrency + 1)
    t0 = [0.0]
    drained = c.Drained(on_drained)

    def client() -> None:
        go.wait()
        while True:
            with take:
                i = next(pending, None)
            if i is None:
                drained()
                return
            req = requests[i]
            done[i] = stream_one(server.port, body_of(req), req.index, req.adapter_id, t0[0], timeout)

    workers = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for w in workers:
        w.start()
    with c.CpuWatch(server.proc.pid) as watch, c.CpuWatch() as own:
        t0[0] = time.perf_counter()
        go.wait()
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0[0]
    result = c.summarize([o for o in done if o is not None], len(requests), concurrency, wall)
    result.foreign_cpu, result.client_cpu = watch.foreign_cores, own.own_cores
    result.server_cpu = watch.own_cores - own.own_cores
    return result


if __name__ == "__main__":
    print(ensure_server())
