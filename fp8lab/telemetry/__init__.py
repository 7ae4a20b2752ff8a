"""Telemetry: a sink that reads layers' scaling state at log steps (layers never write here)."""
