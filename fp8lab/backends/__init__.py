"""Backend selection and the hardware backends (Transformer Engine, torch._scaled_mm)."""
