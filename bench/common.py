"""Shared benchmark code: fixed-seed requests, adapter folders, a gRPC load driver, tables.

Run the scripts from the repository root (`python -m bench.scaling`); the root goes on
sys.path here too, so `python bench/scaling.py` works as well (for `tests.adapters` and
`tests.server`).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS_DIR = REPO / "bench" / "results"
MODEL_NAME = "smollm2-135m-instruct"  # the default model; --model bench-30m for the small random one
# Adapters target all 7 projections of a Llama block, as issue 14 measures.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SEED = 1234
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his her an were are which this be "
    "had not or has but have they one been their two also its new first after who time other "
    "into some more all school year city during over these than people between most state three "
    "world under about only where while being used many such later years both before called then "
    "river music house game water light story north south garden letter morning window market"
)
WORDS = tuple(_WORD_TEXT.split())


# --- locations -------------------------------------------------------------------------
def cache_root() -> Path:
    """The loramux cache (`LORAMUX_CACHE`, else ~/.cache/loramux); benches use `bench/` in it."""
    root = os.environ.get("LORAMUX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "loramux")
    return Path(root)


def bench_dir() -> Path:
    path = cache_root() / "bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def adapters_root() -> Path:
    path = bench_dir() / "adapters"
    path.mkdir(parents=True, exist_ok=True)
    return path


def bench_model() -> Path:
    """The benchmarked model's folder (`MODEL_NAME`: the server's default model unless a
    script's --model names another), built once into the model cache."""
    from loramux.model.loader import resolve_model_path

    return Path(resolve_model_path(MODEL_NAME))


def set_model(name: str) -> None:
    """Benchmark another named model (e.g. smollm2-135m-instruct) in this process."""
    global MODEL_NAME
    MODEL_NAME = name


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


_SNAPSHOT: dict[str, str] = {}  # {"commit": ..., "path": <folder holding the loramux package>}


def snapshot_server_code(rev: str = "HEAD") -> str:
    """Benchmark the committed `rev` instead of the working tree: extract its `server/`
    (`git archive`, read-only for the repository) and put it first on the path of every
    server started afterwards and of this process. Code edited while a long benchmark runs
    then cannot leak into some of its servers. Returns the commit."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], capture_output=True, text=True,
                            check=True).stdout.strip()
    dest = bench_dir() / "code" / commit
    if not (dest / "server" / "loramux" / "__init__.py").is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{commit}-", dir=dest.parent))
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "server"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    if "loramux" in sys.modules:
        raise RuntimeError("snapshot_server_code must run before loramux is imported")
    path = str(dest / "server")
    sys.path.insert(0, path)
    _SNAPSHOT.update(commit=commit, path=path)
    return commit


def server_env() -> dict[str, str]:
    """Environment for server subprocesses: the snapshot's code first on PYTHONPATH, if any."""
    if not _SNAPSHOT:
        return {}
    return {"PYTHONPATH": os.pathsep.join(p for p in (_SNAPSHOT["path"], os.environ.get("PYTHONPATH")) if p)}


def quiet() -> None:
    """Silence the library chatter (progress bars, bitsandbytes' optional-kernel notice)."""
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


# --- adapters ----------------------------------------------------------------------------
def adapter_id(i: int) -> str:
    return f"a{i:03d}"


def ensure_adapters(n: int, rank: int = 8, targets: tuple[str, ...] = DEFAULT_TARGETS,
                    log: bool = True) -> dict[str, Path]:
    """Return {adapter_id: folder} for n real PEFT adapters (random weights, seed = index).

    Folders are cached under <cache>/bench/adapters/<model>-r<rank>-<targets>/ and reused:
    building 128 of them takes a while. Each is built in a temporary folder and renamed.
    """
    base = bench_model()
    group = adapters_root() / f"{MODEL_NAME}-r{rank}-{'-'.join(t.removesuffix('_proj') for t in targets)}"
    group.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    missing = [i for i in range(n) if not _adapter_complete(group / adapter_id(i))]
    if missing and log:
        print(f"building {len(missing)} rank-{rank} adapters into {group} (cached for later runs)", flush=True)
    if missing:
        from tests.adapters import make_adapter

        quiet()
        for i in missing:
            tmp = Path(tempfile.mkdtemp(prefix=f".{adapter_id(i)}-", dir=group))
            try:
                make_adapter(base, tmp, rank=rank, targets=targets, seed=i)
                final = group / adapter_id(i)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    for i in range(n):
        out[adapter_id(i)] = group / adapter_id(i)
    return out


def _adapter_complete(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()


# --- requests ----------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchRequest:
    """One generation request; prompt_tokens counts the BOS the tokenizer prepends."""

    index: int
    adapter_id: str
    prompt: str
    prompt_tokens: int
    max_new_tokens: int
    ignore_eos: bool = False  # generate exactly max_new_tokens (a fixed amount of work)
    params: tuple[tuple[str, object], ...] = ()  # more sampling parameters (e.g. json_schema), as pairs


def power_law_weights(n: int, alpha: float = 1.0) -> list[float]:
    """Popularity of adapter i proportional to (i + 1) ** -alpha (Zipf; S-LoRA's alpha = 1)."""
    weights = [(i + 1) ** -alpha for i in range(n)]
    total = sum(weights)
    return [w / total for w in weights]


def sample_adapters(count: int, n_adapters: int, dist: str, seed: int = SEED, alpha: float = 1.0) -> list[str]:
    """Adapter ids for `count` requests: 'powerlaw' (alpha) or 'uniform' over n adapters."""
    rng = random.Random(f"{seed}-adapters-{dist}-{n_adapters}")
    if dist == "uniform":
        weights = [1.0] * n_adapters
    elif dist == "powerlaw":
        weights = power_law_weights(n_adapters, alpha)
    else:
        raise ValueError(f"unknown distribution {dist!r}")
    # Popularity rank is shuffled, so that "most popular" is not always adapter 0.
    ids = [adapter_id(i) for i in range(n_adapters)]
    rng.shuffle(ids)
    return rng.choices(ids, weights=weights, k=count)


def make_prompt(rng: random.Random, tokens: int) -> str:
    """Text that the byte-level tokenizer turns into exactly `tokens` ids (BOS + one per byte)."""
    chars = tokens - 1
    words: list[str] = []
    length = -1
    while length < chars:
        words.append(rng.choice(WORDS))
        length += len(words[-1]) + 1
    return " ".join(words)[:chars]


_TOKENIZERS: dict[str, object] = {}


def tokenizer():
    """The benchmarked model's tokenizer, loaded once per model."""
    if MODEL_NAME not in _TOKENIZERS:
        from bench.chat_requests import load_tokenizer

        _TOKENIZERS[MODEL_NAME] = load_tokenizer()
    return _TOKENIZERS[MODEL_NAME]


def chat_model() -> bool:
    """Whether the benchmarked model has a chat template (then prompts are chats)."""
    return bool(getattr(tokenizer(), "chat_template", None))


def default_ranges() -> tuple[tuple[int, int], tuple[int, int]]:
    """(prompt tokens, new tokens) when a script is not told: a system prompt and a question
    with answers of realistic length on a chat model; the byte-level range otherwise."""
    return ((40, 400), (16, 256)) if chat_model() else ((32, 128), (32, 128))


def ranges(prompt_tokens: str | None, new_tokens: str | None) -> tuple[tuple[int, int], tuple[int, int]]:
    """The --prompt-tokens / --new-tokens flags, or the model's defaults."""
    prompt, new = default_ranges()
    return (int_range(prompt_tokens) if prompt_tokens else prompt), (int_range(new_tokens) if new_tokens else new)


def make_requests(count: int, n_adapters: int, dist: str = "powerlaw", seed: int = SEED,
                  prompt_range: tuple[int, int] | None = None, new_range: tuple[int, int] | None = None,
                  alpha: float = 1.0, ignore_eos: bool = False) -> list[BenchRequest]:
    """The same prompts and lengths for a given (count, seed) whatever the adapter mix.

    Prompts and lengths come from one random stream, adapter choice from another: runs
    with 1 or 128 adapters send identical text and token budgets. On a chat model the
    prompts are chats (`bench.chat_requests`), else byte-level word salad of exact length.
    """
    default_prompt, default_new = default_ranges()
    prompt_range, new_range = prompt_range or default_prompt, new_range or default_new
    adapters = sample_adapters(count, n_adapters, dist, seed, alpha) if n_adapters else [""] * count
    if chat_model():
        from bench.chat_requests import make_chat_requests

        chats = make_chat_requests(tokenizer(), count, (), seed, prompt_range, new_range, ignore_eos)
        return [BenchRequest(r.index, a, r.prompt, r.prompt_tokens, r.max_new_tokens, ignore_eos)
                for r, a in zip(chats, adapters, strict=True)]
    rng = random.Random(f"{seed}-prompts")
    out = []
    for i in range(count):
        p_len = rng.randint(*prompt_range)
        new = rng.randint(*new_range)
        out.append(BenchRequest(i, adapters[i], make_prompt(rng, p_len), p_len, new, ignore_eos))
    return out


# --- statistics --------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]; NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def add_length_options(p) -> None:
    """--prompt-tokens and --new-tokens "min,max"; unset: the model's defaults (`ranges`)."""
    p.add_argument("--prompt-tokens", default=None,
                   help="min,max prompt tokens per request (default: 40,400 on a chat model, else 32,128)")
    p.add_argument("--new-tokens", default=None,
                   help="min,max new tokens per request (default: 16,256 on a chat model, else 32,128)")


def add_run_options(p) -> None:
    """The options every benchmark script takes: --model, --wait-quiet and --snapshot."""
    p.add_argument("--model", default=MODEL_NAME,
                   help="named model: smollm2-135m-instruct (the default model), bench-30m, tiny")
    p.add_argument("--wait-quiet", type=float, default=0.0,
                   help="before each run or measurement, wait up to this many seconds for other "
                   "processes to leave the CPU")
    p.add_argument("--snapshot", nargs="?", const="HEAD", metavar="REV",
                   help="benchmark a commit (default HEAD, extracted with git archive), not the working tree")


# --- a shared machine ------------------------------------------------------------------
def _busy_jiffies() -> tuple[float, float]:
    """(busy, total) CPU jiffies of the whole machine, from /proc/stat."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return math.nan, math.nan
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy, busy + idle


def _proc_jiffies(pid: int) -> float:
    try:
        parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return float(parts[11]) + float(parts[12])  # utime + stime, all threads


class CpuWatch:
    """CPU (in cores) used by *other* processes while a measurement ran.

    The bench machine may be shared; a figure well above 0 means the run competed for
    the CPU and its numbers are pessimistic. `pids` are ours (this process, the server).
    """

    def __init__(self, *pids: int) -> None:
        self.pids = (os.getpid(), *pids)
        self.foreign_cores = math.nan
        self.own_cores = math.nan

    def __enter__(self) -> CpuWatch:
        self._t0 = time.monotonic()
        self._busy0, _ = _busy_jiffies()
        self._own0 = sum(_proc_jiffies(p) for p in self.pids)
        return self

    def __exit__(self, *exc) -> None:
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        busy, _ = _busy_jiffies()
        own = sum(_proc_jiffies(p) for p in self.pids) - self._own0
        self.own_cores = own / tick / elapsed
        self.foreign_cores = max((busy - self._busy0 - own) / tick / elapsed, 0.0)


def machine_probe(seconds: float = 1.0) -> float:
    """GFLOP/s of a fixed float32 product on every core now: a decode step's LM head shape
    ([32, 576] x [576, 49152], 113 MB of weight, as memory-bound as the server's steps). Taken
    beside each run, its spread across rounds is the machine's own drift: a server's rounds
    cannot be steadier than the machine they run on."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        x, w = torch.randn(32, 576), torch.randn(576, 49152)
        torch.mm(x, w)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.mm(x, w)
            n += 1
        return n * 2 * x.shape[0] * w.numel() / (time.perf_counter() - start) / 1e9
    finally:
        torch.set_num_threads(threads)


def wait_for_quiet(max_wait: float, threshold: float = 0.3, window: float = 3.0) -> float:
    """Wait (up to `max_wait` s) until other processes use under `threshold` cores; return that load."""
    end = time.monotonic() + max_wait
    while True:
        with CpuWatch() as watch:
            time.sleep(window)
        if watch.foreign_cores < threshold or time.monotonic() >= end:
            return watch.foreign_cores
        print(f"  machine busy ({watch.foreign_cores:.1f} cores used by other processes); waiting", flush=True)


# --- the load driver ---------------------------------------------------------------------
@dataclass
class Outcome:
    """What one streamed request gave: times relative to the run start, in seconds."""

    index: int
    adapter_id: str
    sent: float
    token_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # arrival of each token
    error: str = ""

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    @property
    def first(self) -> float:
        return self.token_times[0] if self.token_times else math.nan

    @property
    def last(self) -> float:
        return self.token_times[-1] if self.token_times else math.nan

    @property
    def ttft(self) -> float:
        return self.first - self.sent

    @property
    def tpot(self) -> float:
        return (self.last - self.first) / (self.tokens - 1) if self.tokens > 1 else math.nan


@dataclass
class LoadResult:
    """Aggregates of one load run."""

    requests: int
    concurrency: int
    wall_s: float
    tokens: int
    errors: int
    tokens_per_s: float
    requests_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    latency_p50_s: float
    ttft_all_p50_ms: float  # including the start-up burst
    ttft_all_p99_ms: float
    steady_tokens_per_s: float = math.nan  # while every client is busy (no ramp-up, no tail)
    steady_window_s: float = math.nan
    foreign_cpu: float = math.nan  # cores used by other processes during the run
    client_cpu: float = math.nan  # cores used by this process (the 32 client threads) during the run
    server_cpu: float = math.nan  # cores used by the server process during the run
    outcomes: list[Outcome] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("outcomes")
        return d


class Drained:
    """The moment a closed-loop run's first client finds no request left: until then every
    client had a request in flight (queued or running), after it the run drains. Calls
    `hook` (e.g. a metrics scrape) once, on that client's thread."""

    def __init__(self, hook: Callable[[], None] | None) -> None:
        self._hook, self._lock, self._fired = hook, threading.Lock(), False

    def __call__(self) -> None:
        with self._lock:
            fired, self._fired = self._fired, True
        if not fired and self._hook is not None:
            self._hook()


def run_load(address: str, requests: list[BenchRequest], concurrency: int, timeout: float = 600,
             server_pid: int | None = None, on_drained: Callable[[], None] | None = None) -> LoadResult:
    """Closed loop: `concurrency` threads, each with its own gRPC client, take the next
    request, stream it and time its first token; the run ends when all are answered.
    `on_drained` runs once, when the first client finds nothing left to send (`Drained`)."""
    from loramux.client import Client

    next_index = iter(range(len(requests)))
    lock = threading.Lock()
    outcomes: list[Outcome | None] = [None] * len(requests)
    barrier = threading.Barrier(concurrency + 1)
    start = [0.0]
    drained = Drained(on_drained)

    def worker() -> None:
        with Client(address, timeout=timeout) as client:
            barrier.wait()
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    drained()
                    return
                outcomes[i] = _one(client, requests[i], start[0])

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    with CpuWatch(*([server_pid] if server_pid else [])) as watch, CpuWatch() as client_watch:
        start[0] = time.perf_counter()
        barrier.wait()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start[0]
    result = summarize([o for o in outcomes if o is not None], len(requests), concurrency, wall)
    result.foreign_cpu = watch.foreign_cores
    result.client_cpu = client_watch.own_cores
    result.server_cpu = watch.own_cores - client_watch.own_cores if server_pid else math.nan
    return result


def summarize(done: list[Outcome], n_requests: int, concurrency: int, wall: float) -> LoadResult:
    """Throughput over the whole run; latency percentiles over the steady state.

    The first `concurrency` requests all arrive at t = 0 and are prefilled together, so
    their time to first token measures the start-up burst, not the loaded server: they
    are left out of the TTFT/TPOT percentiles (kept in `ttft_all_p50_ms`) when the run has
    more requests than clients.
    """
    ok = [o for o in done if not o.error]
    steady = [o for o in ok if o.index >= concurrency] if n_requests > concurrency else ok
    tokens = sum(o.tokens for o in ok)
    return LoadResult(
        requests=n_requests, concurrency=concurrency, wall_s=wall, tokens=tokens,
        errors=len(done) - len(ok), tokens_per_s=tokens / wall, requests_per_s=len(ok) / wall,
        ttft_p50_ms=1e3 * percentile([o.ttft for o in steady], 50),
        ttft_p99_ms=1e3 * percentile([o.ttft for o in steady], 99),
        tpot_p50_ms=1e3 * percentile([o.tpot for o in steady if o.tokens > 1], 50),
        tpot_p99_ms=1e3 * percentile([o.tpot for o in steady if o.tokens > 1], 99),
        latency_p50_s=percentile([o.last - o.sent for o in steady], 50),
        ttft_all_p50_ms=1e3 * percentile([o.ttft for o in ok], 50),
        ttft_all_p99_ms=1e3 * percentile([o.ttft for o in ok], 99),
        **_steady(ok, n_requests, concurrency),
        outcomes=done,
    )


def _steady(ok: list[Outcome], n_requests: int, concurrency: int) -> dict:
    """Tokens/s while every client is busy: from the first token of the last request of the
    first wave (every client's first request is running) to the sending of the last request
    (after it, each client that finishes has nothing left to send). What a server under
    sustained load delivers, without the ramp-up and the tail a finite run adds."""
    if n_requests <= concurrency or len(ok) < n_requests:
        return {}
    start = max(o.first for o in ok if o.index < concurrency)
    end = max(o.sent for o in ok)
    if end <= start:
        return {}
    tokens = sum(1 for o in ok for t in o.token_times if start <= t < end)
    return {"steady_tokens_per_s": tokens / (end - start), "steady_window_s": end - start}


def _one(client, req: BenchRequest, t0: float) -> Outcome:
    import grpc

    out = Outcome(req.index, req.adapter_id, time.perf_counter() - t0)
    try:
        for msg in client.stream(req.prompt, req.adapter_id, max_new_tokens=req.max_new_tokens,
                                 ignore_eos=req.ignore_eos, **dict(req.params)):
            now = time.perf_counter() - t0
            out.token_ids.extend(msg.token_ids)
            out.token_times.extend([now] * len(msg.token_ids))
    except grpc.RpcError as exc:
        out.error = f"{exc.code().name}: {exc.details()}"
    return out


# --- servers -----------------------------------------------------------------------------
def start_server(workdir: Path, adapters: dict[str, Path], slots: int, max_batch: int = 32,
                 max_rank: int = 64, extra: tuple[str, ...] = ()):
    """A real `loramux serve` subprocess on a loopback port with `adapters` registered by RPC.

    The adapter folders stay in the bench cache (an allowed root); the watched
    --adapter-dir is an empty folder of the run, so exactly these adapters are registered.
    """
    from tests.server import ServerProcess

    model = bench_model()
    (workdir / "adapters").mkdir(parents=True, exist_ok=True)
    srv = ServerProcess(
        workdir, "--model", str(model), "--adapter-dir", str(workdir / "adapters"),
        "--allow-adapter-root", str(adapters_root()), "--adapter-scan-interval", "0",
        "--max-active-adapters", str(slots), "--max-batch-size", str(max_batch),
        "--max-lora-rank", str(max_rank), "--max-queue", "4096", "--log-level", "WARNING", *extra,
        env=server_env(),
    )
    try:
        with srv.client() as client:
            for aid, folder in adapters.items():
                client.register(aid, str(folder))
    except BaseException:
        srv.stop()
        raise
    return srv


def warm_up(address: str, count: int = 4) -> None:
    """A few bare-base requests so that the first timed request pays no one-off costs."""
    reqs = make_requests(count, 0, seed=SEED + 99, new_range=(8, 8))
    run_load(address, reqs, concurrency=min(count, 2))


def server_counters(srv) -> dict[str, float]:
    """Raw adapter cache and batch counters from the server's Prometheus endpoint."""
    m = srv.metrics()
    names = {
        "cache_hits": "adapter_cache_hits_total", "cache_misses": "adapter_cache_misses_total",
        "evictions": "adapter_evictions_total", "load_s_sum": "adapter_load_seconds_sum",
        "loads": "adapter_load_seconds_count", "rows_sum": "batch_size_sum", "decode_steps": "batch_size_count",
        "adapters_sum": "batch_adapters_sum", "parks": "adapter_preemptions_total",
    }
    return {k: m.get(f"loramux_{v}", math.nan) for k, v in names.items()}


def measured_load(srv, requests: list[BenchRequest], concurrency: int) -> tuple[LoadResult, dict[str, float]]:
    """`run_load` on a loramux server and `server_stats` over the run, with `batch_size_busy`:
    rows a decode step while every client had a request in flight (`Drained`; issue 14's
    "mean decode batch while 32 clients are busy")."""
    before, drained = server_counters(srv), []
    res = run_load(srv.address, requests, concurrency=concurrency, server_pid=srv.proc.pid,
                   on_drained=lambda: drained.append(server_counters(srv)))
    stats = server_stats(before, server_counters(srv))
    stats["batch_size_busy"] = server_stats(before, drained[0])["batch_size_mean"] if drained else math.nan
    return res, stats


def server_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the server did between two `server_counters` scrapes: cache traffic, batch shape."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    return {
        "cache_hits": d["cache_hits"], "cache_misses": d["cache_misses"],
        "evictions": d["evictions"], "parks": d["parks"],
        "load_ms_mean": 1e3 * ratio(d["load_s_sum"], d["loads"]),
        "decode_steps": d["decode_steps"],
        "batch_size_mean": ratio(d["rows_sum"], d["decode_steps"]),
        "batch_adapters_mean": ratio(d["adapters_sum"], d["decode_steps"]),
    }


# --- output ------------------------------------------------------------------------------
def fmt(value, digits: int = 1) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.{digits}f}"
    return str(value)


def table(headers: list[str], rows: list[list], digits: int = 1) -> str:
    """A plain-text table with right-aligned numbers."""
    cells = [[fmt(v, digits) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def environment() -> dict:
    import platform

    import torch

    import loramux

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": _SNAPSHOT.get("commit") or git_commit(),
        "model": MODEL_NAME,
        "server_code": f"snapshot {_SNAPSHOT['path']}" if _SNAPSHOT else "working tree",
        "loramux": str(Path(loramux.__file__).parent),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }


def write_results(name: str, data: dict, env: dict | None = None) -> Path:
    """Write bench/results/<name>-<timestamp>.json and <name>-latest.json; return the first.

    `env` is `environment()` taken when the run started (the commit the servers ran)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "environment": env or environment(), **data}
    text = json.dumps(_finite(payload), indent=2, default=_json_default)
    path = RESULTS_DIR / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(text)
    (RESULTS_DIR / f"{name}-latest.json").write_text(text)
    return path


def _finite(value):
    """NaN is not JSON: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def in_process(num_slots: int, max_rank: int, device_name: str = "cpu"):
    """The 4-bit bench model wired as `app.build_engine` wires it, in this process: (runner,
    store, slots, metrics, device) with `num_slots` device slots padded to `max_rank`.
    Imported late: `start` may first put a snapshot of the code on the path."""
    from loramux.lora.slots import AdapterSlots
    from loramux.lora.store import AdapterStore
    from loramux.metrics import Metrics
    from loramux.model.loader import ModelSpec, load_base, resolve_device, resolve_dtype
    from loramux.model.runner import Runner

    device = resolve_device(device_name)
    dtype = resolve_dtype("auto", device)
    model, tokenizer = load_base(ModelSpec(str(bench_model()), "nf4", device, dtype))
    runner = Runner(model, tokenizer, num_slots, max_rank, device, dtype)
    runner.calibrate()
    store = AdapterStore(runner.layer_shapes, (adapters_root().resolve(),), max_rank, 1 << 30, dtype)
    metrics = Metrics()
    slots = AdapterSlots(store, runner.layers, num_slots, 2 << 30, metrics)
    return runner, store, slots, metrics, device


def workdir(name: str) -> Path:
    """A fresh scratch folder for server logs and ready files of one script run."""
    path = bench_dir() / "runs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def int_range(text: str) -> tuple[int, int]:
    """"32,128" -> (32, 128): the --prompt-tokens / --new-tokens flags."""
    lo, hi = (int(x) for x in text.split(","))
    return lo, hi


def start(snapshot: str | None, model: str | None = None) -> dict:
    """What every script does first: pick the code (a snapshot or the working tree) and the
    model, record the environment, silence library chatter."""
    if snapshot:
        snapshot_server_code(snapshot)
    if model:
        set_model(model)
    env = environment()
    quiet()
    return env
