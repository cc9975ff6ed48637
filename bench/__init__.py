"""polystream benchmarks: ``python -m bench.ingest`` (see its docstring)."""
