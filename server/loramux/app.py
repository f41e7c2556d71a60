"""Wires the model, adapter tiers, engine, gRPC server, metrics and shutdown together."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loramux import memory
from loramux.api.auth import AdminTokenInterceptor
from loramux.api.interceptor import ErrorInterceptor
from loramux.api.servicers import AdapterRegistryServicer, GenerationServicer
from loramux.config import ServerConfig
from loramux.engine.engine import Engine
from loramux.engine.watcher import AdapterDirWatcher
from loramux.lora import registry_file
from loramux.lora.layers import slot_memory
from loramux.lora.peft_rules import describe_base
from loramux.lora.slots import AdapterSlots
from loramux.lora.store import AdapterStore
from loramux.metrics import Metrics
from loramux.model.loader import DEFAULT_MODEL, ModelSpec, load_base, resolve_device, resolve_dtype
from loramux.model.prefix import PrefixCache, default_bytes
from loramux.model.runner import Runner
from loramux.model.threads import apart, single_threaded
from loramux.pb.loramux.v1 import loramux_pb2 as pb
from loramux.pb.loramux.v1 import loramux_pb2_grpc as pb_grpc

log = logging.getLogger("loramux")
SERVICES = ("loramux.v1.Generation", "loramux.v1.AdapterRegistry")


def load_runner(cfg: ServerConfig, device, dtype) -> Runner:
    """The base with its LoRA slots, its cost model measured."""
    model, tokenizer = load_base(ModelSpec(cfg.model, cfg.quantization, device, dtype))
    runner = Runner(model, tokenizer, cfg.max_active_adapters, cfg.max_lora_rank, device, dtype,
                    fused_4bit=cfg.cpu_4bit_kernel == "fused", fused_lora=cfg.cpu_lora_kernel == "fused",
                    fused_attention=cfg.cpu_attention_kernel == "fused")
    runner.calibrate()
    return runner


def build_engine(cfg: ServerConfig, metrics: Metrics) -> Engine:
    """Load the base, attach LoRA slots, and make the adapter tiers and the engine."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.compute_dtype, device)
    started = time.perf_counter()
    memory.apply(cfg.host_memory)
    # Loaded and calibrated with the engine's team size on a thread that then ends, and this
    # thread kept off torch's parallel work: the engine thread's OpenMP team is the only one
    # (model/threads.py: a second one made every decode step 1.5x slower on 2 cores).
    runner = apart(lambda: load_runner(cfg, device, dtype), cfg.torch_threads)
    single_threaded()
    metrics.model_memory.set(runner.model_bytes())
    metrics.lora_slot_memory.set(runner.slot_bytes)
    log.info("model ready in %.1fs: weights %.1f MiB; LoRA slots (%d x rank %d) take up to %.1f MiB, "
             "allocated per layer as adapters target it", time.perf_counter() - started,
             runner.model_bytes() / 2**20, cfg.max_active_adapters, cfg.max_lora_rank,
             slot_memory(runner.layers)[1] / 2**20)
    cfg.adapter_dir.mkdir(parents=True, exist_ok=True)
    store = AdapterStore(runner.layer_shapes, cfg.adapter_roots, cfg.max_lora_rank,
                         cfg.max_adapter_bytes, dtype, base=describe_base(runner.model, runner.layers))
    slots = AdapterSlots(store, runner.layers, cfg.max_active_adapters, cfg.host_cache_bytes, metrics)
    prefix_bytes = default_bytes(device) if cfg.prefix_cache_bytes is None else cfg.prefix_cache_bytes
    log.info("prefix cache: %s", f"{prefix_bytes / 2**20:.0f} MiB" if prefix_bytes else "off")
    return Engine(runner, store, slots, metrics, cfg.max_batch_size, cfg.max_queue, cfg.max_model_len,
                  registry_path=cfg.adapter_dir / registry_file.FILE_NAME, log_requests=cfg.log_requests,
                  max_slot_wait=cfg.max_slot_wait, min_turn=cfg.min_slot_turn,
                  max_prefill_tokens=cfg.max_prefill_tokens, mixed_steps=cfg.mixed_steps == "on",
                  torch_threads=cfg.torch_threads, prefix=PrefixCache(prefix_bytes, metrics) if prefix_bytes else None)


class App:
    """Owns the running server: engine threads, watcher, gRPC server, HTTP front door, health, metrics."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.engine = build_engine(cfg, self.metrics)
        self.watcher = AdapterDirWatcher(self.engine, cfg.adapter_dir, cfg.adapter_scan_interval)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.http = None  # HttpServer when --http-port is set
        self.port = self.metrics_port = self.http_port = 0

    async def start(self) -> None:
        # Registrations and uploads validate tensors on these threads: one torch thread each.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(thread_name_prefix="loramux-io", initializer=single_threaded))
        self.engine.start()
        self.engine.restore()
        self.watcher.start()
        interceptors = [ErrorInterceptor(self.metrics)]
        if self.cfg.admin_token:
            interceptors.insert(0, AdminTokenInterceptor(self.cfg.admin_token))
        limit = self.cfg.max_message_bytes
        self.server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)])
        generation = GenerationServicer(self.engine, self.cfg.default_max_new_tokens, self.cfg.max_new_tokens_limit)
        pb_grpc.add_GenerationServicer_to_server(generation, self.server)
        registry = AdapterRegistryServicer(self.engine, self.cfg.adapter_dir.resolve(),
                                           self.cfg.max_adapter_bytes + (64 << 10), self.watcher.adopt)
        pb_grpc.add_AdapterRegistryServicer_to_server(registry, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [pb.DESCRIPTOR.services_by_name[s.split(".")[-1]].full_name for s in SERVICES]
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        address = f"{self.cfg.host}:{self.cfg.port}"
        if self.cfg.tls_cert:
            creds = grpc.ssl_server_credentials([(self.cfg.tls_key.read_bytes(), self.cfg.tls_cert.read_bytes())])
            self.port = self.server.add_secure_port(address, creds)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"cannot bind {self.cfg.host}:{self.cfg.port}")
        await self.server.start()
        if self.cfg.http_port:
            await self._start_http(generation)
        if self.cfg.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(self.cfg.host, self.cfg.metrics_port)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        metrics = f"metrics on :{self.metrics_port}" if self.cfg.metrics_port >= 0 else "metrics off"
        http = f"OpenAI HTTP on :{self.http_port}" if self.http else "HTTP off"
        log.info("serving gRPC on %s:%d, %s, %s", self.cfg.host, self.port, http, metrics)
        if self.cfg.ready_file:
            # Written aside, then renamed: a watcher that sees the file never reads half of it.
            tmp = self.cfg.ready_file.with_name(self.cfg.ready_file.name + ".tmp")
            tmp.write_text(json.dumps({"port": self.port, "metrics_port": self.metrics_port,
                                       "http_port": self.http_port}))
            os.replace(tmp, self.cfg.ready_file)

    async def _start_http(self, generation: GenerationServicer) -> None:
        """The OpenAI-compatible routes on this event loop, with gRPC's host, TLS and admin token."""
        from loramux.api.http import OpenAIRoutes
        from loramux.api.http_server import HttpServer

        routes = OpenAIRoutes(generation, self.engine, self.metrics, self.cfg.model or DEFAULT_MODEL,
                              self.cfg.admin_token, int(time.time()))
        self.http = HttpServer(routes.app(), self.cfg.host, self.cfg.http_port, self.cfg.tls_cert, self.cfg.tls_key)
        await self.http.start()
        self.http_port = self.http.port

    async def _set_health(self, status) -> None:
        for name in ("", *SERVICES):
            await self.health.set(name, status)

    async def drain_and_stop(self) -> None:
        """Refuse new work, let running requests finish (up to the grace period), stop."""
        log.info("draining: new requests get UNAVAILABLE; grace %.0fs", self.cfg.drain_timeout)
        self.engine.draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = time.monotonic() + self.cfg.drain_timeout
        while not self.engine.idle() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.watcher.stop()
        if self.http is not None:
            await self.http.stop()
        await self.server.stop(grace=1.0)
        self.engine.stop()
        log.info("stopped")

    async def run_until_signal(self) -> None:
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.drain_and_stop()


def serve(cfg: ServerConfig) -> int:
    from loramux.model.gguf import ModelUnavailable

    try:
        app = App(cfg)
    except ModelUnavailable as exc:  # the user's fix is in the message, a traceback adds nothing
        log.error("%s", exc)
        return 1
    asyncio.run(app.run_until_signal())
    return 0
