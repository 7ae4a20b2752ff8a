"""Telemetry: sinks that read layers' scaling state at log steps (layers never write here),
and the Monitor that drives them from any training loop."""
