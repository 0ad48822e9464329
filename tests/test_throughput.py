"""benchmarks/throughput.py on a tiny problem (the real measurement is benchmarks/results/throughput.md)."""

import pytest

from benchmarks import throughput


def test_throughput_counts_flops_of_one_update_per_seed():
    """benchmarks/throughput.py on a tiny problem: XLA's FLOP count of one fused update is
    positive, doubles with two vmapped seeds, and GFLOP/s = FLOPs per update x updates per second."""
    data = throughput.synthetic_data(200, 5, 2)
    one = throughput.measure("iql", 1, 5, 2, 32, updates=4, repeats=1, data=data)
    two = throughput.measure("iql", 2, 5, 2, 32, updates=4, repeats=1, data=data)
    assert one["gflop_per_update"] > 0 and one["updates_per_s"] > 0
    assert two["gflop_per_update"] == pytest.approx(2 * one["gflop_per_update"], rel=0.1)
    assert one["gflops"] == pytest.approx(one["gflop_per_update"] * one["updates_per_s"])
    td3 = throughput.measure("td3_bc", 1, 5, 2, 32, updates=4, repeats=1, data=data)
    assert td3["gflop_per_update"] > 0  # td3_bc, whose update is a group of critic steps, is counted too
