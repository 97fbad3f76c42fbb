"""Benchmarks: each compares against a peer in the same run, prints ratios and writes bench/results/*.md."""
