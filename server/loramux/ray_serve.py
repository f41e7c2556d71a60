"""Scale-out on Ray Serve: every replica runs a loramux engine in-process.

Ray Serve's model multiplexing does the routing: the adapter id is the multiplexed model
id, so a request goes to a replica that already has its adapter active, and a replica
loads (and evicts, LRU) at most `max_active_adapters` of them. Replicas share the adapter
folder (a volume in a cluster) and scale with load through Ray Serve's autoscaling.

    serve run deploy/ray/serve.yaml          # or: loramux serve --ray-replicas 2
    handle.options(multiplexed_model_id="my-adapter").generate.remote("Hello")

HTTP: POST / with JSON {"prompt": ..., "max_new_tokens": ...} and the header
`serve_multiplexed_model_id: <adapter id>` (empty or absent: the bare base).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from ray import serve

from loramux.config import ServerConfig
from loramux.engine.request import Params

log = logging.getLogger(__name__)


class _ResidentAdapter:
    """What Ray's multiplexed LRU holds for one adapter on a replica."""

    def __init__(self, engine, adapter_id: str) -> None:
        self.engine, self.adapter_id = engine, adapter_id

    async def __del__(self) -> None:
        # Evicted by Ray's LRU: drop its tensors here; it stays registered.
        self.engine.slots.forget(self.adapter_id)


class LoramuxReplica:
    """Owns one engine (model, adapter tiers, step loop) inside a Ray Serve replica."""

    def __init__(self, config: dict) -> None:

        from loramux.app import build_engine
        from loramux.engine.watcher import AdapterDirWatcher
        from loramux.metrics import Metrics

        cfg = ServerConfig(**config)  # torch_threads: replicas share the node's cores
        self.engine = build_engine(cfg, Metrics())
        self.engine.start()
        self.watcher = AdapterDirWatcher(self.engine, cfg.adapter_dir, cfg.adapter_scan_interval)
        self.watcher.start()
        self.limit, self.default_new = cfg.max_new_tokens_limit, cfg.default_max_new_tokens
        self.replica = serve.get_replica_context().replica_tag

    async def _load(self, adapter_id: str) -> _ResidentAdapter:
        # Warm the host cache; the copy into a device slot happens at admission.
        await self.engine.prefetch(adapter_id)
        return _ResidentAdapter(self.engine, adapter_id)

    async def generate(self, prompt: str, max_new_tokens: int | None = None, temperature: float = 0.0,
                       top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop: list[str] | None = None) -> dict:
        adapter_id = serve.get_multiplexed_model_id()
        if adapter_id:
            await self.get_adapter(adapter_id)
        params = Params(max_new_tokens=max_new_tokens or self.default_new, temperature=temperature,
                        top_p=top_p, top_k=top_k, seed=seed or None, stop=tuple(stop or ()))
        if not 1 <= params.max_new_tokens <= self.limit:
            raise ValueError(f"max_new_tokens must be in [1, {self.limit}]")
        req = self.engine.submit(adapter_id, prompt, params, "", None)
        done = await self.engine.complete(req)
        return {"text": done.text, "token_ids": done.token_ids,
                "finish_reason": done.finish.name if done.finish else None,
                "adapter_id": adapter_id, "replica": self.replica}

    async def __call__(self, request) -> dict:
        body = await request.json()
        return await self.generate(**body)


def deployment(max_active_adapters: int = 8, **options):
    """The Ray Serve deployment class; multiplexing holds as many adapters as device slots."""
    async def get_adapter(self, adapter_id: str) -> _ResidentAdapter:
        return await self._load(adapter_id)

    multiplexed = serve.multiplexed(max_num_models_per_replica=max_active_adapters)(get_adapter)
    cls = type("LoramuxReplica", (LoramuxReplica,), {"get_adapter": multiplexed})
    return serve.deployment(cls, name="loramux", **options)


def build_app(args: dict | None = None):
    """Application builder for `serve run loramux.ray_serve:build_app` (args from the YAML):
    `num_replicas` (int or "auto"), `autoscaling_config`, `torch_threads`, and any
    ServerConfig field (model, adapter_dir, max_active_adapters, ...)."""
    args = dict(args or {})
    options = {k: args.pop(k) for k in ("num_replicas", "autoscaling_config", "ray_actor_options") if k in args}
    for key in ("adapter_dir", "ready_file", "tls_cert", "tls_key"):
        if key in args and args[key] is not None:
            args[key] = Path(args[key])
    if "allow_adapter_roots" in args:
        args["allow_adapter_roots"] = tuple(Path(p) for p in args["allow_adapter_roots"])
    slots = args.get("max_active_adapters", ServerConfig.max_active_adapters)
    return deployment(slots, **options).bind(args)


def config_dict(cfg: ServerConfig) -> dict:
    """ServerConfig as the plain dict a replica is built from."""
    out = asdict(cfg)
    out["adapter_dir"] = str(cfg.adapter_dir.resolve())
    out["allow_adapter_roots"] = [str(p) for p in cfg.allow_adapter_roots]
    for key in ("ready_file", "tls_cert", "tls_key"):
        out[key] = str(out[key]) if out[key] is not None else None
    return out


def run_local(cfg: ServerConfig, replicas: int) -> int:
    """`loramux serve --ray-replicas N`: a local Ray cluster, N replicas, HTTP ingress on
    cfg.host:cfg.port; blocks until interrupted."""
    import signal
    import threading

    import ray

    ray.init(include_dashboard=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    args = config_dict(cfg)
    args["num_replicas"] = replicas
    serve.run(build_app(args), name="loramux", route_prefix="/")
    log.info("Ray Serve: %d loramux replicas, HTTP on %s:%d", replicas, cfg.host, cfg.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0
