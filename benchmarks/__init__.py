"""Benchmarks: training-step throughput across backends, data-pipeline throughput, model FLOPs.

`python -m benchmarks.train_throughput` and `python -m benchmarks.data_throughput`; the measured
numbers, with machine, versions and commit, go to benchmarks/RESULTS.md.
"""
