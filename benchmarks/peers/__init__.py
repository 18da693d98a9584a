"""Other libraries' flows, trained and evaluated the way flowlab's own models are.

Each peer module trains on the same data stream (same sampler, same seed), under the same
learning-rate schedule and training clock, writes weight snapshots at given training times, and
evaluates on the same held-out points, so the time-to-quality benchmark compares like with like.
"""
