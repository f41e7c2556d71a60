"""Issue 6 operations: the dashboard's metrics exist on a real server; JSON request logs."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.server import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = ("_bucket", "_sum", "_count")


def dashboard_metrics() -> set[str]:
    dash = json.loads((ROOT / "deploy" / "grafana" / "loramux-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return set(re.findall(r"loramux_[a-z_]+", " ".join(exprs)))


def test_dashboard_metrics_exist_and_requests_are_logged(tmp_path):
    srv = ServerProcess(tmp_path, "--adapter-dir", str(tmp_path / "adapters"), "--log-requests")
    try:
        with srv.client() as c:
            c.generate("Hello", max_new_tokens=5)
            c.generation.Generate(_request("with-id"), timeout=30)
        exported = {series.split("{")[0] for series in srv.metrics()}
    finally:
        srv.stop()
    used = dashboard_metrics()
    assert len(used) >= 15
    missing = sorted(m for m in used if m not in exported)
    assert not missing, f"dashboard uses metrics the server does not export: {missing}"
    lines = [json.loads(line) for line in srv.log().splitlines() if line.startswith('{"event": "request"')]
    assert [(e["status"], e["generated_tokens"]) for e in lines if e["request_id"] == "with-id"] == [("OK", 3)]
    first = lines[0]
    assert first["status"] == "OK" and first["finish"] in ("LENGTH", "EOS") and first["prompt_tokens"] == 6
    assert first["duration_s"] >= first["ttft_s"] >= first["queue_wait_s"] >= 0


def _request(request_id: str):
    from loramux.client import sampling
    from loramux.pb.loramux.v1 import loramux_pb2 as pb

    return pb.GenerateRequest(prompt="Hi", request_id=request_id, params=sampling(max_new_tokens=3))


def test_prometheus_example_scrapes_the_metrics_port():
    text = (ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text()
    assert "job_name: loramux" in text and ":9090" in text
