"""Continuous-batching engine: requests, paged KV blocks, scheduler, model runner, sampler."""
