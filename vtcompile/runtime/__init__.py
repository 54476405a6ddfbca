"""Staged execution of compiled programs: prefill (stages, routers between them), per-layer KV caches, the
compiled decode step and generate."""
