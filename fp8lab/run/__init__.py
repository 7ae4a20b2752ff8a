"""Running recipes: config -> variants trained on the same batches -> telemetry."""
