"""The app: the ``fp8lab`` command and its training runs (recipe -> config -> variants trained on
the same batches -> telemetry -> summary and report), the corpus, ``info`` and ``report``.

Invariant: the library (formats -> options -> scaling -> quantize -> gemm -> layers ->
telemetry) never imports from here; this package builds on the library's public pieces.
Reading order: ``cli`` -> ``recipe_file``, ``overrides``, ``config`` (``checks``, ``sections``,
``validate``, ``precision``) -> ``runner`` (``folder``, ``runlog``, ``variant``, ``summary``)
-> ``report``, ``whatif_report``, ``info``; the rest are the runner's helpers.
"""
