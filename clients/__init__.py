"""Clients of the elas-serve HTTP API (installed as elas_serve.clients)."""
