"""CPU benchmark of merge_tokens: the C++ backend vs the pure-PyTorch reference at ViT-B/16 shapes (docs/design.md §7).

B=64 (and B=1), N=197 (class token + 14x14 grid), C=768, Dh=64, torch.set_num_threads(2).

    pytest bench/bench_ops_cpu.py --benchmark-group-by=param:case --benchmark-columns=median,iqr,rounds
    python bench/bench_ops_cpu.py      # the A/B ratios, measured alternately in one process (median of 15)

Targets (cpp vs reference): forward >= 4x, forward+backward >= 3x, no-grad >= 6x, no-grad at B=1 >= 5x.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from fpet_kernels.backends import get_backend

THREADS = 2
GRID, PREFIX, CHANNELS, DIM = (14, 14), 1, 768, 64
BACKENDS = ("reference", "cpp")  # registry entries (fpet_kernels.backends)
CASES = {  # name: (batch, mode)
    "forward": (64, "forward"),
    "forward_backward": (64, "forward_backward"),
    "no_grad": (64, "no_grad"),
    "no_grad_b1": (1, "no_grad"),
}
TARGETS = {"forward": 4.0, "forward_backward": 3.0, "no_grad": 6.0, "no_grad_b1": 5.0}


def make_step(impl, batch: int, mode: str):
    """A zero-argument callable running one merge_tokens call (and its backward) on fixed random inputs."""
    g = torch.Generator().manual_seed(0)
    tokens = PREFIX + GRID[0] * GRID[1]
    x = torch.randn(batch, tokens, CHANNELS, generator=g)
    metric = torch.randn(batch, tokens, DIM, generator=g)
    size = torch.rand(batch, tokens, generator=g) + 0.5
    kwargs = dict(grid_size=GRID, num_prefix_tokens=PREFIX)
    if mode == "no_grad":
        def step():
            with torch.inference_mode():
                impl.merge_tokens(x, metric, size, **kwargs)
        return step
    x, metric, size = (t.requires_grad_() for t in (x, metric, size))
    if mode == "forward":
        return lambda: impl.merge_tokens(x, metric, size, **kwargs)

    def step():
        out, merged_size = impl.merge_tokens(x, metric, size, **kwargs)
        (out.sum() + merged_size.sum()).backward()
    return step


@pytest.fixture(autouse=True)
def fixed_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(not get_backend("cpp").available, reason=str(get_backend("cpp").unavailable_reason()))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_merge_tokens(benchmark, case, backend):
    batch, mode = CASES[case]
    benchmark.group = f"merge_tokens {case}"
    step = make_step(get_backend(backend).implementation(), batch, mode)
    benchmark.pedantic(step, rounds=7 if batch > 1 else 50, warmup_rounds=2)


def measure_ratios(repeats: int = 15) -> dict:
    """Median times and reference/cpp ratios, the two backends run alternately (warm-up first)."""
    torch.set_num_threads(THREADS)
    results = {}
    for case, (batch, mode) in CASES.items():
        steps = {name: make_step(get_backend(name).implementation(), batch, mode) for name in BACKENDS}
        inner = 1 if batch > 1 else 20
        times = {name: [] for name in steps}
        for step in steps.values():
            step()
            step()
        for _ in range(repeats):
            for name, step in steps.items():
                start = time.perf_counter()
                for _ in range(inner):
                    step()
                times[name].append((time.perf_counter() - start) / inner)
        medians = {name: statistics.median(t) for name, t in times.items()}
        results[case] = (medians["reference"], medians["cpp"], medians["reference"] / medians["cpp"])
    return results


if __name__ == "__main__":
    get_backend("cpp").implementation()  # raises, saying how to build, when the extension is missing
    print(f"threads={THREADS}, torch {torch.__version__}, B x N x C x Dh = 64 x 197 x 768 x 64")
    for case, (t_ref, t_cpp, ratio) in measure_ratios().items():
        status = "ok" if ratio >= TARGETS[case] else "MISSED"
        print(f"{case:18s} reference {t_ref * 1e3:9.3f} ms   cpp {t_cpp * 1e3:8.3f} ms   "
              f"ratio {ratio:6.1f}x (target {TARGETS[case]:.0f}x) {status}")
