"""Every Prometheus object of the server, in one place, on one registry per server.

No label grows with the number of adapters: per-adapter figures are totals, never
labelled by adapter id (vLLM's reviewers rejected unbounded label sets for this reason).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server,
)

disable_created_metrics()  # the *_created series only add noise to every scrape

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_SIZE = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Owns the registry and the metric objects the engine, cache and API update."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "loramux_"
        self.requests = Counter(p + "requests", "Finished requests by gRPC status", ["status"], registry=r)
        self.request_duration = Histogram(p + "request_duration_seconds", "Arrival to last token", buckets=_LATENCY, registry=r)
        self.queue_wait = Histogram(p + "queue_wait_seconds", "Arrival to admission into the batch", buckets=_LATENCY, registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY, registry=r)
        self.tpot = Histogram(p + "time_per_output_token_seconds", "Mean time between tokens of a request", buckets=_TOKEN, registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter(p + "generated_tokens", "Generated tokens", registry=r)
        self.batch_size = Histogram(p + "batch_size", "Rows per decode step", buckets=_SIZE, registry=r)
        self.batch_adapters = Histogram(p + "batch_adapters", "Distinct adapters per decode step", buckets=_SIZE, registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "Requests waiting for admission", registry=r)
        self.running = Gauge(p + "running_requests", "Requests in the running batch", registry=r)
        self.adapter_cache_hits = Counter(p + "adapter_cache_hits", "Adapter already in a device slot when needed", registry=r)
        self.adapter_cache_misses = Counter(p + "adapter_cache_misses", "Adapter loaded into a device slot when needed", registry=r)
        self.adapter_evictions = Counter(p + "adapter_evictions", "Adapters evicted from device slots", registry=r)
        self.adapter_load_seconds = Histogram(p + "adapter_load_seconds", "Host or disk to device slot", buckets=_TOKEN, registry=r)
        self.adapters_active = Gauge(p + "adapters_active", "Adapters resident in device slots", registry=r)
        self.adapters_registered = Gauge(p + "adapters_registered", "Registered adapters", registry=r)
        self.adapter_host_cache_bytes = Gauge(p + "adapter_host_cache_bytes", "Bytes of adapter tensors in the host cache", registry=r)
        self.model_memory = Gauge(p + "model_memory_bytes", "Base model weights and buffers, bytes", registry=r)
        self.lora_slot_memory = Gauge(p + "lora_slot_memory_bytes", "Stacked LoRA slot tensors on the device, bytes", registry=r)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP; return the bound port (useful with port 0)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]
