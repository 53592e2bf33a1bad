"""benchmarks/speed.py: block shapes, the per-block kernel timer, and the 8B projection formula."""

from __future__ import annotations

import pytest
import torch

from benchmarks import speed


def _shapes(size):
    return {name.split(".")[-2]: tuple(shape) for name, shape in speed.block_matrices(size)}


def test_block_shapes_follow_the_configs():
    # Llama-3-8B has grouped-query attention (8 KV heads): k and v are 1024 × 4096.
    assert _shapes("8B") == {
        "q_proj": (4096, 4096),
        "k_proj": (1024, 4096),
        "v_proj": (1024, 4096),
        "o_proj": (4096, 4096),
        "gate_proj": (14336, 4096),
        "up_proj": (14336, 4096),
        "down_proj": (4096, 14336),
    }
    # The benchmark's own 1B models have one KV head per query head.
    one_b = _shapes("1B")
    assert one_b["k_proj"] == one_b["q_proj"] == (2048, 2048)
    assert one_b["down_proj"] == (2048, 5504)


@pytest.mark.slow
def test_kernel_times_cover_every_method_on_the_same_block():
    # One thread, as the benchmark runs (two threads on a busy 2-core machine spin for seconds).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = speed.kernel_times("0.02B", [2], lapack=False)
    finally:
        torch.set_num_threads(threads)
    kernels = [row["kernel"] for row in report["rows"]]
    assert kernels == speed.kernel_names()
    for required in ("ties", "task_arithmetic", "consensus_ta", "consensus_ties", "rmm", *speed.SVD_KERNELS):
        assert required in kernels
    assert all(row["fast_cpu_s"] > 0 and "lapack_cpu_s" not in row for row in report["rows"])
    markdown = speed.render_kernels(report)
    ties_row = next(line for line in markdown.splitlines() if line.startswith("| 0.02B | 2 | ties |"))
    assert "| 1.00 |" in ties_row  # its own ratio to ties


def test_projection_formula():
    # 0.1B (1e8 parameters, 8 blocks of 1e6): the pipeline's ties row took 100 CPU s and its
    # block kernel 5 s, so its rest is 100 − 8·5 = 60 s; task_arithmetic's rest is 20 − 8·1 = 12 s.
    report = {
        "sizes": {"0.1B": {"parameters": 1e8}},
        "rows": [
            {"size": "0.1B", "T": 2, "label": "ties", "ok": True, "cpu_s": 100.0},
            {"size": "0.1B", "T": 2, "label": "task_arithmetic", "ok": True, "cpu_s": 20.0},
        ],
    }
    kernels = {
        "blocks": {"0.1B": {"layers": 8, "matrices": [["w", [1000, 1000]]]}, "8B": {"layers": 32, "matrices": [["w", [10000, 10000]]]}},
        "rows": [
            {"size": "0.1B", "T": 2, "kernel": "ties", "fast_cpu_s": 5.0},
            {"size": "0.1B", "T": 2, "kernel": "task_arithmetic", "fast_cpu_s": 1.0},
            {"size": "8B", "T": 4, "kernel": "ties", "fast_cpu_s": 50.0},
            {"size": "8B", "T": 4, "kernel": "task_arithmetic", "fast_cpu_s": 10.0},
            {"size": "8B", "T": 4, "kernel": "adarank apply", "fast_cpu_s": 200.0},
        ],
    }
    rows = {row["method"]: row for row in speed.kernel_projection(report, kernels, startup_cpu_s=2.0)}
    io = (12 - 2) * (8.03e9 / 1e8) * (4 + 1) / (2 + 1)  # reading T + 1 models, in all parameters
    other_8b, other_small = 8.03e9 - 32 * 1e8, 1e8 - 8 * 1e6  # non-block parameters
    extra_ties = (60 - 12) * (other_8b / other_small) * (4 / 2)
    assert rows["ties"]["total_cpu_s"] == pytest.approx(2 + 32 * 50 + io + extra_ties)
    assert rows["task_arithmetic"]["total_cpu_s"] == pytest.approx(2 + 32 * 10 + io)
    # AdaRank has no pipeline row: its rest is task_arithmetic's.
    assert rows["adarank apply"]["total_cpu_s"] == pytest.approx(2 + 32 * 200 + io)
    assert rows["ties"]["vs_ties"] == pytest.approx(1.0)
