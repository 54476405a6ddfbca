"""Staged execution of compiled programs: prefill (stages, branch decisions between them), per-layer KV caches, the
compiled decode step and generate."""
