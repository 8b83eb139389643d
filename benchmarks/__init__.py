"""The project's benchmarks: three suites (quality, speed, metrics) declared as config grids, results as CSV.

`python -m benchmarks <suite> [key=value ...]` runs one suite and regenerates RESULTS.md;
`python -m benchmarks results` only regenerates it. See benchmarks/README.md.
"""
