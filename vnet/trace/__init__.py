"""Tracing sessions: attach probes, stream and decode events."""

from .session import DeviceTrace, Hook, Plan, Trace, TraceStats

__all__ = ["DeviceTrace", "Hook", "Plan", "Trace", "TraceStats"]
