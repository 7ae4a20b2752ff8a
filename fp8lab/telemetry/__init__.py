"""Telemetry: sinks that read layers' scaling state at log steps, and the Monitor for any loop.

Invariant: layers never write here, and nothing here imports a backend: the collector reads
layers through ``scaling_view``. Reading order: ``keys`` (what a value is) -> ``collector``
(one log step's snapshot) -> ``step`` (the log-step protocol) -> ``tensorboard``,
``overview``, ``accuracy``, ``fp16_flush`` (sinks and probes) -> ``monitor``, ``integrations``.
"""
