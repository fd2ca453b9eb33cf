"""Benchmarks of mindspeed-cp: communication, balance, memory and speed against their limits.

``make bench`` (= ``python -m benchmarks.run``) writes ``benchmarks/results/cpu.json``, ``cpu.md`` and the
plots; ``python -m benchmarks.gpu_decomposition`` is the one-GPU decomposition benchmark. See
``docs/performance.md``.
"""
