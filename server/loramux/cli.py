"""`loramux serve | generate | chat | adapters | build-model | train | merge`.

Every `serve` flag can also be set by an environment variable: --max-queue is
LORAMUX_MAX_QUEUE, and so on. A flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

DEFAULT_ADDRESS = "127.0.0.1:50051"


def _env_default(flag: str, default, kind):
    raw = os.environ.get("LORAMUX_" + flag.lstrip("-").replace("-", "_").upper())
    if raw is None:
        return default
    if kind is bool:
        return raw.lower() in ("1", "true", "yes", "on")
    if kind is list:
        return [p for p in raw.split(os.pathsep) if p]
    return kind(raw)


def _add(p: argparse.ArgumentParser, flag: str, kind, default, help: str) -> None:
    value = _env_default(flag, default, kind)
    env = "LORAMUX_" + flag.lstrip("-").replace("-", "_").upper()
    if kind is list:
        p.add_argument(flag, action="append", default=value, help=f"{help} [{env}, {os.pathsep}-separated]")
    elif kind is bool:
        p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=f"{help} [{env}]")
    else:
        p.add_argument(flag, type=kind, default=value, help=f"{help} (default: {default}) [{env}]")


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the gRPC server")
    _add(p, "--host", str, "127.0.0.1", "address to bind (0.0.0.0 for all interfaces)")
    _add(p, "--port", int, 50051, "gRPC port (0: any free port)")
    _add(p, "--metrics-port", int, 9090, "Prometheus /metrics port (0: any free, -1: off)")
    _add(p, "--http-port", int, 0, "OpenAI-compatible HTTP port beside gRPC (same host, TLS, admin token; 0: off)")
    _add(p, "--model", str, None, "named model (smollm2-135m-instruct, tiny, bench-30m), local HF folder or hub "
         "id; unset: smollm2-135m-instruct, built once from its PyPI package into the model cache")
    _add(p, "--quantization", str, "nf4", "nf4 | fp4 | int8 | none")
    _add(p, "--compute-dtype", str, "auto", "auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16")
    _add(p, "--device", str, "auto", "auto | cpu | cuda | cuda:N")
    _add(p, "--cpu-4bit-kernel", str, "fused", "fused (loramux's 4-bit kernel for decode-sized inputs on AVX2/AVX-512 "
         "CPUs, built once with the C++ compiler) | dequantize (bitsandbytes' dequantize-then-matmul only)")
    _add(p, "--cpu-lora-kernel", str, "fused", "fused (loramux's kernel for decode steps' LoRA term, every adapter "
         "in one call per layer, on AVX2/AVX-512 CPUs with float32 compute) | torch (tensor ops only)")
    _add(p, "--cpu-attention-kernel", str, "fused", "fused (loramux's kernel for decode steps' attention, each "
         "row's keys and values read once for its query heads, on AVX2/AVX-512 CPUs with float32 compute) | "
         "sdpa (torch's scaled_dot_product_attention only)")
    _add(p, "--adapter-dir", Path, Path("adapters"), "adapter folders registered by name, watched while running")
    _add(p, "--allow-adapter-root", list, [], "another folder RegisterAdapter may read from (repeatable)")
    _add(p, "--max-active-adapters", int, 32, "adapters resident on the device at once (slots)")
    _add(p, "--max-lora-rank", int, 16, "largest adapter rank accepted")
    _add(p, "--host-cache-bytes", int, 2 << 30, "bytes of adapter tensors kept in host RAM")
    _add(p, "--prefix-cache-bytes", int, None, "bytes of prompt keys and values kept for prompts that start the "
         "same way, per adapter (0: off); unset: 1/16 of the device's memory (RAM on CPU)")
    _add(p, "--max-adapter-bytes", int, 1 << 30, "largest adapter weights file accepted")
    _add(p, "--max-batch-size", int, 16, "rows decoded together")
    _add(p, "--torch-threads", int, 0, "torch threads of the engine thread; 0: torch's default (every "
         "usable core on CPU)")
    _add(p, "--max-queue", int, 256, "waiting requests before RESOURCE_EXHAUSTED")
    _add(p, "--max-prefill-tokens", int, 512, "most tokens (rows x longest prompt) prefilled together, "
         "and the piece size of a longer prompt; while rows decode, a turn prefills about one decode "
         "step's worth (measured), at least one prompt")
    _add(p, "--mixed-steps", str, "on", "on (a prompt admitted while rows decode, up to --max-prefill-tokens "
         "uncached tokens, is computed inside the next decode step's forward: no prefill forward of its own, "
         "no stall of the running rows) | off (a prefill forward between decode steps)")
    _add(p, "--host-memory", str, "keep", "keep (host memory freed by a step is kept and reused by the next: "
         "no page faults on fresh pages, the process holds its peak heap; glibc only) | release (the C "
         "library's defaults: freed blocks go back to the kernel)")
    _add(p, "--max-slot-wait", float, 0.02, "seconds an adapter's requests may wait for a device slot "
         "before a running adapter is parked (its rows leave the batch, KV kept) to give it one")
    _add(p, "--min-slot-turn", float, 1.5, "seconds a running adapter keeps its slot before it may be "
         "parked; larger loads adapters less often, smaller makes waiters wait less")
    _add(p, "--max-new-tokens-limit", int, 1024, "largest max_new_tokens accepted")
    _add(p, "--default-max-new-tokens", int, 64, "max_new_tokens when a request leaves it unset")
    _add(p, "--max-model-len", int, None, "prompt + answer tokens; unset: the model's maximum")
    _add(p, "--adapter-scan-interval", float, 2.0, "seconds between --adapter-dir scans (0: off)")
    _add(p, "--drain-timeout", float, 30.0, "seconds running requests get to finish on SIGTERM")
    _add(p, "--admin-token", str, None, "require this bearer token for adapter registry writes")
    _add(p, "--tls-cert", Path, None, "PEM certificate chain: serve TLS (with --tls-key)")
    _add(p, "--tls-key", Path, None, "PEM private key for --tls-cert")
    _add(p, "--max-message-bytes", int, 4 << 20, "largest gRPC message received or sent")
    _add(p, "--log-requests", bool, False, "log one JSON line per request (id, adapter, tokens, timings, status)")
    _add(p, "--ready-file", Path, None, "write {port, metrics_port} as JSON here once serving")
    _add(p, "--log-level", str, "INFO", "DEBUG | INFO | WARNING | ERROR")
    _add(p, "--ray-replicas", int, 0, "serve on a local Ray Serve cluster with N engine replicas (HTTP on --port)")


def _client_parsers(sub) -> None:
    g = sub.add_parser("generate", help="send a prompt and stream the answer to the terminal")
    _add(g, "--address", str, DEFAULT_ADDRESS, "server address")
    g.add_argument("prompt")
    g.add_argument("--adapter", default="", help="adapter id (empty: the bare base)")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[])
    g.add_argument("--no-stream", action="store_true", help="one unary call instead of a stream")
    _add(g, "--tls-ca", Path, None, "PEM roots to trust: connect with TLS")

    c = sub.add_parser("chat", help="chat in the terminal: one line per turn, /reset clears the history, "
                       "Ctrl-D quits")
    _add(c, "--address", str, DEFAULT_ADDRESS, "server address")
    c.add_argument("--adapter", default="", help="adapter id (empty: the bare base)")
    c.add_argument("--max-new-tokens", type=int, default=None)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--system", default=None, help="system message at the start of the conversation")
    _add(c, "--tls-ca", Path, None, "PEM roots to trust: connect with TLS")

    a = sub.add_parser("adapters", help="list, register or unregister adapters")
    _add(a, "--address", str, DEFAULT_ADDRESS, "server address")
    _add(a, "--admin-token", str, None, "the server's --admin-token")
    _add(a, "--tls-ca", Path, None, "PEM roots to trust: connect with TLS")
    asub = a.add_subparsers(dest="action", required=True)
    asub.add_parser("list")
    r = asub.add_parser("register")
    r.add_argument("adapter_id")
    r.add_argument("path")
    u = asub.add_parser("unregister")
    u.add_argument("adapter_id")
    up = asub.add_parser("upload", help="send a local adapter folder to the server (stored and registered)")
    up.add_argument("folder", type=Path)
    up.add_argument("--id", dest="adapter_id", default=None, help="adapter id (default: the folder name)")

    h = sub.add_parser("health", help="exit 0 if the server's gRPC health check says SERVING")
    _add(h, "--address", str, DEFAULT_ADDRESS, "server address")

    b = sub.add_parser("build-model", help="build a named model into the model cache and print its folder")
    b.add_argument("--name", default=None, help="smollm2-135m-instruct (default) | tiny | bench-30m")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loramux", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _client_parsers(sub)
    for name, helptext in (("train", "train a QLoRA adapter (see `loramux train --help`)"),
                           ("merge", "merge an adapter into its base model")):
        sub.add_parser(name, help=helptext, add_help=False)
    return parser


def _serve(args) -> int:
    from loramux.app import serve
    from loramux.config import ServerConfig

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    requests_log = logging.getLogger("loramux.requests")  # JSON lines, nothing around them
    json_lines = logging.StreamHandler()
    json_lines.setFormatter(logging.Formatter("%(message)s"))
    requests_log.addHandler(json_lines)
    requests_log.propagate = False
    try:
        cfg = ServerConfig(
            host=args.host, port=args.port, metrics_port=args.metrics_port, http_port=args.http_port,
            model=args.model,
            quantization=args.quantization, compute_dtype=args.compute_dtype, device=args.device,
            cpu_4bit_kernel=args.cpu_4bit_kernel,
            cpu_lora_kernel=args.cpu_lora_kernel, cpu_attention_kernel=args.cpu_attention_kernel,
            adapter_dir=args.adapter_dir, allow_adapter_roots=tuple(Path(p) for p in args.allow_adapter_root),
            max_active_adapters=args.max_active_adapters, max_lora_rank=args.max_lora_rank,
            host_cache_bytes=args.host_cache_bytes, prefix_cache_bytes=args.prefix_cache_bytes,
            max_adapter_bytes=args.max_adapter_bytes,
            max_batch_size=args.max_batch_size, torch_threads=args.torch_threads,
            max_queue=args.max_queue,
            max_slot_wait=args.max_slot_wait, min_slot_turn=args.min_slot_turn,
            max_prefill_tokens=args.max_prefill_tokens, mixed_steps=args.mixed_steps, host_memory=args.host_memory,
            max_new_tokens_limit=args.max_new_tokens_limit,
            default_max_new_tokens=args.default_max_new_tokens, max_model_len=args.max_model_len,
            adapter_scan_interval=args.adapter_scan_interval, drain_timeout=args.drain_timeout,
            ready_file=args.ready_file, admin_token=args.admin_token, tls_cert=args.tls_cert,
            tls_key=args.tls_key, max_message_bytes=args.max_message_bytes, log_requests=args.log_requests,
        )
    except ValueError as exc:
        print(f"loramux serve: {exc}", file=sys.stderr)
        return 2
    if args.ray_replicas > 0:
        from loramux.ray_serve import run_local

        if cfg.http_port:  # replicas run engines, not servers: Ray Serve's proxy is the ingress
            logging.getLogger("loramux").warning("--http-port is not served with --ray-replicas; "
                                                 "Ray Serve's HTTP proxy on --port is the ingress")

        return run_local(cfg, args.ray_replicas)
    return serve(cfg)


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path else None


def _generate(args) -> int:
    from loramux.client import Client

    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
              "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed, "stop": args.stop}
    with Client(args.address, tls_ca=_read(args.tls_ca)) as client:
        if args.no_stream:
            print(client.generate(args.prompt, args.adapter, **params).text)
            return 0
        for msg in client.stream(args.prompt, args.adapter, **params):
            print(msg.text, end="", flush=True)
        print()
    return 0


def _chat(args) -> int:
    """Read a user turn per line, stream the answer, keep the history; /reset clears it.
    A failed turn is reported on stderr and left out of the history; EOF ends with 0."""
    import grpc

    from loramux.client import Client

    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, str]] = []
    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    with Client(args.address, tls_ca=_read(args.tls_ca)) as client:
        while True:
            if interactive:
                print("you> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                if interactive:
                    print()
                return 0
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if line.strip() == "/reset":
                history.clear()
                print("(history cleared)", flush=True)
                continue
            turn = [*history, {"role": "user", "content": line}]
            answer = []
            try:
                for msg in client.chat_stream(system + turn, args.adapter, **params):
                    print(msg.text, end="", flush=True)
                    answer.append(msg.text)
            except grpc.RpcError as exc:
                if answer:
                    print(flush=True)
                print(f"loramux: {exc.code().name}: {exc.details()}", file=sys.stderr, flush=True)
                continue
            print(flush=True)
            history = [*turn, {"role": "assistant", "content": "".join(answer)}]


def _chat_until_interrupted(args) -> int:
    try:
        return _chat(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _adapters(args) -> int:
    from loramux.client import Client

    with Client(args.address, admin_token=args.admin_token, tls_ca=_read(args.tls_ca)) as client:
        if args.action == "register":
            info = client.register(args.adapter_id, str(Path(args.path).resolve()))
            print(f"registered {info.adapter_id}: rank {info.rank}, {info.size_bytes} bytes")
        elif args.action == "upload":
            info = client.upload(args.folder, args.adapter_id)
            print(f"uploaded and registered {info.adapter_id}: rank {info.rank}, {info.size_bytes} bytes")
        elif args.action == "unregister":
            print(f"unregistered {client.unregister(args.adapter_id).adapter_id}")
        else:
            for a in client.list():
                print(f"{a.adapter_id}\trank={a.rank}\talpha={a.alpha:g}\t{','.join(a.target_modules)}\t{a.source}\t{a.path}")
    return 0


def _health(args) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(args.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0 if serving else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("train", "merge"):
        from loramux.trainer.cli import main as trainer_main

        return trainer_main(argv)
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "build-model":
        from loramux.model.gguf import ModelUnavailable
        from loramux.model.loader import named_models, resolve_model_path

        if args.name is not None and args.name not in named_models():
            print(f"loramux build-model: unknown model {args.name!r}; choose one of {named_models()}", file=sys.stderr)
            return 2
        try:
            print(resolve_model_path(args.name))
        except ModelUnavailable as exc:
            print(f"loramux build-model: {exc}", file=sys.stderr)
            return 1
        return 0
    import grpc

    commands = {"generate": _generate, "chat": _chat_until_interrupted, "adapters": _adapters, "health": _health}
    try:
        return commands[args.command](args)
    except grpc.RpcError as exc:
        print(f"loramux: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
