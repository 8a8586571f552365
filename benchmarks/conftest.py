"""Side-by-side benchmark reporting: ratios between a benchmark and its peer, printed after the run.

A benchmark declares its peer with ``benchmark.extra_info.update(peer="<test name of the peer>",
target="<what the ratio must satisfy>", ratio_min=<float> or ratio_max=<float>)``; the ratio is
``min(peer) / min(this)`` (> 1 means this one is faster; the minimum over rounds is the least noisy
estimate of a CPU-bound cost on a shared machine, medians are printed beside it). Run with
``pytest benchmarks/ --benchmark-enable``.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Every benchmark runs torch on one intra-op thread, peers alike: the peers are single-threaded
    Python, and on a 2-core machine torch's second thread only adds contention at these sizes (on a
    loaded machine it made tensor code 2-8x slower and the ratios noise)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not getattr(session, "benchmarks", None):
        return
    by_name = {b.name: b for b in session.benchmarks}
    lines = []
    for bench in session.benchmarks:
        info = bench.extra_info or {}
        peer = by_name.get(info.get("peer", ""))
        if peer is None or bench.stats is None or peer.stats is None:
            continue
        ratio = peer.stats.min / bench.stats.min
        ratio_median = peer.stats.median / bench.stats.median
        ok = True
        if "ratio_min" in info:
            ok = ratio >= info["ratio_min"]
        if "ratio_max" in info:
            ok = ok and ratio <= info["ratio_max"]
        lines.append(
            f"{'PASS' if ok else 'MISS'}  {bench.name}  vs  {peer.name}: "
            f"{ratio:.2f}x faster (min {bench.stats.min * 1e3:.2f} ms vs {peer.stats.min * 1e3:.2f} ms; "
            f"medians give {ratio_median:.2f}x)"
            f"  target: {info.get('target', '-')}"
        )
    if lines:
        terminalreporter.section("differad-rl benchmark ratios")
        for line in lines:
            terminalreporter.write_line(line)
