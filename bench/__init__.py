"""Benchmarks: scripts that measure and save figures (never timed assertions in tests).

Run one from the repository root as ``python -m bench.<name>``; each calls
:func:`bench._runner.save_result`, which writes ``bench/results/<name>.json``. Then
``python -m bench.report`` regenerates ``BENCHMARKS.md`` from all result files.
"""
