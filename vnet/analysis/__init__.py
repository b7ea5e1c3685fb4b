"""Offline analysis of traced events: paths, per-hop latency, losses."""
