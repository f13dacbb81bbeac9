"""Write deploy/grafana/dashboards/elas-serve.json, the Grafana dashboard, from the panels below.

Every query reads the metric names of design section 6 (`elas:` prefix, label `model_name`).
Latency panels are percentiles of the server's histograms over Grafana's `$__rate_interval`;
`$model_name` is the dashboard's model selector (all models by default). tests/test_deploy.py
checks that every series named here exists on a running server and that every query returns data
through a real Prometheus; it also checks that the committed JSON is what this script writes.

    python deploy/grafana/make_dashboard.py
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "elas-serve.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}  # provisioning/datasources/prometheus.yaml
SEL = '{model_name=~"$model_name"}'
RATE = "[$__rate_interval]"


def quantiles(metric: str, qs=(0.5, 0.9, 0.99), by: str = "le") -> list[tuple[str, str]]:
    return [(f"p{round(q * 100)}", f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket{SEL}{RATE})))")
            for q in qs]


# (row, title, unit, kind, [(legend, PromQL)])
PANELS = [
    ("Latency", "Time to first token", "s", "timeseries", quantiles("elas:time_to_first_token_seconds")),
    ("Latency", "Inter-token latency", "s", "timeseries", quantiles("elas:inter_token_latency_seconds")),
    ("Latency", "End-to-end request latency", "s", "timeseries", quantiles("elas:e2e_request_latency_seconds")),
    ("Latency", "Queue time (arrival to first scheduled)", "s", "timeseries",
     quantiles("elas:request_queue_time_seconds", (0.5, 0.99))),
    ("Throughput and load", "Token throughput", "tokens/s", "timeseries", [
        ("prompt", f"sum(rate(elas:prompt_tokens_total{SEL}{RATE}))"),
        ("generation", f"sum(rate(elas:generation_tokens_total{SEL}{RATE}))")]),
    ("Throughput and load", "Requests running and waiting", "short", "timeseries", [
        ("running", f"sum(elas:num_requests_running{SEL})"),
        ("waiting", f"sum(elas:num_requests_waiting{SEL})")]),
    ("Throughput and load", "KV-cache usage", "percentunit", "timeseries", [
        ("usage", f"max(elas:kv_cache_usage_perc{SEL})")]),
    ("Throughput and load", "Finished requests by reason", "reqps", "timeseries", [
        ("{{finished_reason}}", f"sum by (finished_reason) (rate(elas:request_success_total{SEL}{RATE}))")]),
    ("Engine", "Preemptions", "short", "timeseries", [
        ("preemptions/s", f"sum(rate(elas:num_preemptions_total{SEL}{RATE}))")]),
    ("Engine", "Prefix-cache hit rate", "percentunit", "timeseries", [
        ("hit rate", f"sum(rate(elas:prefix_cache_hits_total{SEL}{RATE})) / "
                     f"sum(rate(elas:prefix_cache_queries_total{SEL}{RATE}))")]),
    ("Engine", "FFN backend", "none", "stat", [
        ("{{backend}}", f"max by (backend) (elas:ffn_backend_info{SEL})")]),
    ("Engine", "FFN activation density (after squared ReLU, before 2:4)", "percentunit", "timeseries", [
        ("density", f"avg(elas:ffn_activation_density{SEL})")]),
    ("Engine", "Engine step time (median) by phase", "s", "timeseries", [
        ("{{phase}}", f"histogram_quantile(0.5, sum by (le, phase) (rate(elas:step_seconds_bucket{SEL}{RATE})))")]),
]


def panel(pid: int, title: str, unit: str, kind: str, targets: list[tuple[str, str]], x: int, y: int) -> dict:
    out = {"id": pid, "type": kind, "title": title, "datasource": DATASOURCE,
           "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
           "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
           "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr,
                        "legendFormat": legend, "range": True} for i, (legend, expr) in enumerate(targets)]}
    if kind == "stat":
        out["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                          "textMode": "name", "colorMode": "none", "graphMode": "none"}
    else:
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                          "tooltip": {"mode": "multi", "sort": "none"}}
    return out


def dashboard() -> dict:
    panels, y, pid, row, col = [], 0, 1, None, 0
    for row_title, title, unit, kind, targets in PANELS:
        if row_title != row:
            y += 8 if row is not None and col else 0
            panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False, "panels": [],
                           "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
            pid, y, row, col = pid + 1, y + 1, row_title, 0
        elif col == 3:
            y, col = y + 8, 0
        panels.append(panel(pid, title, unit, kind, targets, 8 * col, y))
        pid, col = pid + 1, col + 1
    model = {"name": "model_name", "label": "model", "type": "query", "datasource": DATASOURCE,
             "definition": "label_values(elas:num_requests_running, model_name)",
             "query": {"query": "label_values(elas:num_requests_running, model_name)", "refId": "model_name"},
             "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
             "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}
    return {"uid": "elas-serve", "title": "elas-serve", "tags": ["elas-serve", "llm"], "editable": False,
            "schemaVersion": 39, "version": 1, "refresh": "10s", "timezone": "browser",
            "time": {"from": "now-30m", "to": "now"}, "templating": {"list": [model]}, "panels": panels}


def main() -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"{OUT}: {sum(p['type'] != 'row' for p in dashboard()['panels'])} panels")


if __name__ == "__main__":
    main()
