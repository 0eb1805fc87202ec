"""The ground floor: errors, the run directory's layout (:mod:`~lte.core.run_dir`), the run's record,
safe output directories and fault injection. Imports nothing from the rest of ``lte`` and nothing heavy."""
