"""The monitoring stack outside Docker: a real Prometheus scraping a server, and the dashboard's queries.

Used by tests/test_deploy.py and benchmarks/dashboard_snapshot.py (no Docker engine, hence no
Grafana, on the machines that run them). `Prometheus` starts the `prometheus` binary (Debian's
package) with deploy/prometheus.yml, its target pointed at the server under test and its scrape
interval shortened; `panel_queries` reads the Grafana dashboard JSON and substitutes Grafana's
variables the way Grafana would for "all models" (`$model_name` -> `.*`) and a chosen
`$__rate_interval`, so Prometheus evaluates exactly the panels' PromQL.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from elas_serve.clients.process import ManagedProcess

DEPLOY = Path(__file__).resolve().parent
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "elas-serve.json"
SCRAPE_CONFIG = DEPLOY / "prometheus.yml"
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "le", "inf", "nan"}


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    kind: str  # timeseries | stat
    unit: str
    legend: str
    expr: str  # Grafana variables substituted


def panel_queries(rate_interval: str = "30s", model: str = ".*", path: Path = DASHBOARD) -> list[PanelQuery]:
    """Every target of every panel of the dashboard, ready for Prometheus."""
    out = []
    for p in json.loads(path.read_text())["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", rate_interval).replace("$model_name", model)
            out.append(PanelQuery(p["title"], p["type"], p["fieldConfig"]["defaults"].get("unit", ""),
                                  t.get("legendFormat", ""), expr))
    return out


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads (label matchers, grouping and durations removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range durations
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        rest = text[m.end():].lstrip()
        if not rest.startswith("(") and m.group().lower() not in PROMQL_WORDS:
            names.add(m.group())
    return names


class Prometheus(ManagedProcess):
    """`prometheus` on loopback scraping `target` ("127.0.0.1:PORT") every `scrape_interval`."""

    def __init__(self, target: str, port: int, workdir: Path, scrape_interval: str = "1s"):
        if shutil.which("prometheus") is None:
            raise FileNotFoundError("no prometheus binary (Debian: apt-get install prometheus)")
        config = yaml.safe_load(SCRAPE_CONFIG.read_text())
        config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = scrape_interval
        for job in config["scrape_configs"]:
            job["static_configs"] = [{"targets": [target]}]
        workdir.mkdir(parents=True, exist_ok=True)
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{port}"
        cmd = ["prometheus", f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
               f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
        super().__init__(cmd, f"{self.url}/-/ready", workdir / "prometheus.log", 60.0, name="prometheus",
                         stop_timeout=20.0)

    def _api(self, path: str, **params: Any) -> Any:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30, trust_env=False)
        body = r.json()
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body.get('error', r.text)}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant vector: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        return self._api("query", query=expr, **({"time": at} if at is not None else {}))["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        """Range: [{"metric": {...}, "values": [[t, "v"], ...]}, ...]."""
        return self._api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def wait_for_scrapes(self, n: int = 1, timeout: float = 60.0) -> float:
        """Wait until `n` more scrapes of the target have succeeded; the time of the last one."""
        deadline, seen = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            targets = self._api("targets")["activeTargets"]
            scraped = [t for t in targets if t["health"] == "up"]
            if scraped:
                last = scraped[0]["lastScrape"]
                if seen is None:
                    seen = [last]
                elif last != seen[-1]:
                    seen.append(last)
                if len(seen) > n:
                    return time.time()
            time.sleep(0.1)
        raise TimeoutError(f"fewer than {n} successful scrapes within {timeout:.0f} s: {self._api('targets')}")
