"""The `privet` command and what it runs: simulation, sweeps, reports, deployment helpers.

The repository's top-level `experiments/` folder holds what users run and read (configs,
examples, benchmarks); it is not installed.
"""
