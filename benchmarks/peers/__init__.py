"""Other libraries' flows, trained and evaluated the way flowlab's own models are.

Each peer module trains on the same data stream (same sampler, same seed), under the same
optimizer, learning-rate schedule and training clock, and evaluates on the same held-out points,
so the benchmarks compare like with like: ``zuko_cnf`` (zuko's CNF, with weight snapshots at
given training times, for the time-to-quality benchmark) and ``flow_peers`` (zuko's and nflows'
MAF and NSF, for the discrete-flow benchmark).
"""
