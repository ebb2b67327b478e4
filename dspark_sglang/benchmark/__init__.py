"""Shared helpers of the benchmark programs (workloads, runners, peers, tables, plots)."""
