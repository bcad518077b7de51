"""Benchmark drivers, apart from the method: they time and measure the method's parts and write the tables in
``docs/`` (``pepeseg3d bench-render``, ``bench-contrast``, ``bench-step``, ``bench-priors``,
``python -m pepeseg3d_ns.benchmarks.contrast_parts``). The method packages never import from here."""
