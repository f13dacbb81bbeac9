"""Clients of the elas-serve HTTP API (installed as elas_serve.clients): `elas-loadtest`.

  cli.py             argparse entry point: `elas-loadtest run` (vLLM bench serve's flags), `compare`
  loadgen.py         one load-test run: arrivals, concurrency, bounds, the result dict
  client.py          HTTP: loopback guard, server info, one timed streaming request, /metrics scrapes
  metrics.py         TTFT / TPOT / ITL / E2EL, throughputs and goodput as vLLM's `bench serve` defines them
  dataset.py         random token-id prompts, ShareGPT files and prompts files
  tokens.py          token counts: a local tokenizer.json or the server's /tokenize
  process.py         a local service (server, Prometheus) in a subprocess, ready on an HTTP check
  report.py          the summary table and the result JSON of a run
  compare.py         the same sweep against servers of several FFN backends
  compare_report.py  JSON + markdown ratios + PNG plots of a comparison

Importing this package does not import torch (only `compare` does, to start servers).
"""
