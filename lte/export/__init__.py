"""Export: tune per-layer thresholds (:mod:`~lte.export.thresholds`) and write a checkpoint that runs
sparse with ``trust_remote_code=True`` (:mod:`~lte.export.exporter`; ``remote/`` holds the code every
export carries). ``from lte.export import export, ExportRequest`` works: those names load lazily."""

_EXPORTS = {"export": "exporter", "ExportRequest": "request", "summary": "exporter"}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'lte.export' has no attribute {name!r}")
