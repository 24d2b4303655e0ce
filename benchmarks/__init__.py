"""The benchmark of neps-redis against NePS's file-based state.

`bench` is the command (``python benchmarks/bench.py --help``); `workload`
holds the trial, optimizer and lifecycle both backends run; `lifecycle`
runs it in worker processes; `probes` measures the server's floor, the
steps as a run grows, memory per trial, round trips and export; `plot`
draws the results. Nothing here is imported by the package or its tests'
fixtures: the benchmark measures the package from the outside.
"""
