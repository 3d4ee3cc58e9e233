"""syncd's benchmarks: `python -m benchmarks.sync` measures a full sync against the simulator.

Three processes take part, so that each one's CPU and memory can be told apart:
`benchmarks.sync` orchestrates and prints, `benchmarks.simserver` serves the simulated VSPC,
and every measured phase runs in a fresh `benchmarks.phases` process.
"""
