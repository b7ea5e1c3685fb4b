"""Tracing sessions: attach probes, stream and decode events."""

from .session import DeviceTrace, Hook, TraceStats

__all__ = ["DeviceTrace", "Hook", "TraceStats"]
