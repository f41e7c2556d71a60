"""Every Prometheus object of the server, in one place, on one registry per server.

No label grows with the number of adapters: per-adapter figures are totals, never
labelled by adapter id (vLLM's reviewers rejected unbounded label sets for this reason).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

disable_created_metrics()  # the *_created series only add noise to every scrape

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_GRAMMAR = (2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 7.5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
_SIZE = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Owns the registry and the metric objects the engine, cache and API update."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()

        def counter(name: str, doc: str, labels=()) -> Counter:
            return Counter("loramux_" + name, doc, labels, registry=r)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge("loramux_" + name, doc, registry=r)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram("loramux_" + name, doc, buckets=buckets, registry=r)

        # frontend: "grpc" or "http" (the OpenAI routes), so both front doors count here.
        self.requests = counter("requests", "Finished generation requests by gRPC status and front door",
                                ["status", "frontend"])
        self.request_duration = histogram("request_duration_seconds", "Arrival to last token", _LATENCY)
        self.queue_wait = histogram("queue_wait_seconds", "Arrival to admission into the batch", _LATENCY)
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token", _LATENCY)
        self.tpot = histogram("time_per_output_token_seconds", "Mean time between a request's tokens", _TOKEN)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of admitted requests")
        self.mixed_prompt_tokens = counter("mixed_prompt_tokens", "Prompt tokens computed inside decode steps "
                                           "(--mixed-steps), not in prefill forwards of their own")
        self.generated_tokens = counter("generated_tokens", "Generated tokens")
        self.batch_size = histogram("batch_size", "Rows per decode step", _SIZE)
        self.batch_adapters = histogram("batch_adapters", "Distinct adapters per decode step", _SIZE)
        self.queue_depth = gauge("queue_depth", "Requests waiting for admission")
        self.running = gauge("running_requests", "Requests in the running batch")
        self.parked = gauge("parked_requests", "Running requests parked until their adapter has a slot")
        self.adapter_cache_hits = counter("adapter_cache_hits", "Adapter already in a device slot when needed")
        self.adapter_cache_misses = counter("adapter_cache_misses", "Adapter loaded into a device slot when needed")
        self.adapter_evictions = counter("adapter_evictions", "Adapters evicted from device slots")
        self.adapter_preemptions = counter("adapter_preemptions", "Running adapters parked for waiting ones")
        self.adapter_load_seconds = histogram("adapter_load_seconds", "Host or disk to device slot", _TOKEN)
        self.adapters_active = gauge("adapters_active", "Adapters resident in device slots")
        self.adapters_registered = gauge("adapters_registered", "Registered adapters")
        self.adapter_host_cache_bytes = gauge("adapter_host_cache_bytes", "Adapter tensor bytes in the host cache")
        self.prefix_cache_hit_tokens = counter("prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache")
        self.prefix_cache_query_tokens = counter("prefix_cache_query_tokens",
                                                 "Prompt tokens looked up in the prefix cache (hit rate: hit / query)")
        self.prefix_cache_bytes = gauge("prefix_cache_bytes", "Keys and values held by the prefix cache, bytes")
        self.prefix_cache_evictions = counter("prefix_cache_evictions", "Prefix cache blocks evicted for room")
        self.model_memory = gauge("model_memory_bytes", "Base model weights and buffers, bytes")
        self.lora_slot_memory = gauge("lora_slot_memory_bytes", "Stacked LoRA slot tensors on the device, bytes")
        self.grammar_compile_seconds = histogram("grammar_compile_seconds", "Compiling a structured-output "
                                                 "constraint not in the cache", _GRAMMAR)
        self.grammar_cache_hits = counter("grammar_cache_hits", "Constrained requests whose grammar was cached")
        self.grammar_cache_misses = counter("grammar_cache_misses", "Constrained requests whose grammar was compiled")
        self.grammar_mask_seconds = histogram("grammar_mask_seconds", "CPU time of one step's token masks: "
                                              "computing (on the helper thread or not) and applying", _GRAMMAR)
        self.grammar_mask_wait_seconds = histogram("grammar_mask_wait_seconds", "Time a step waited for the masks "
                                                   "the helper thread computes during the forward", _GRAMMAR)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP; return the bound port (useful with port 0)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]
