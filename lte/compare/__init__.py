"""Comparison: ``lte compare`` (the harness), its lm-eval tasks (``task_configs/``), the Wasserstein
analysis and the baselines LTE is compared with. Sits above :mod:`lte.export`; only the app layer
(CLI, pipeline, tools) imports it."""
