"""prefixattn's benchmark suite (pytest-benchmark); see benchmarks/README.md.

A package so that its ``conftest.py`` is imported as ``benchmarks.conftest`` and never
shadows ``tests/conftest.py``, which the unit tests import by its plain name.
"""
