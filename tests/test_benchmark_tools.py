"""fpet_kernels.tools.benchmark: FLOP counting (attention included), tokens per block, round-robin timing."""
from __future__ import annotations

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from fpet_kernels import add_pet, apply_fpet
from fpet_kernels.tools import benchmark


def _linear_flops(model, images):
    """FLOPs of everything but attention: FlopCounterMode with SDPA forced onto its math path, minus the two
    attention matmuls counted by hand."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(images)
    return counter.get_total_flops()


@pytest.mark.parametrize("img_size", [32, 64])
def test_count_gflops_includes_attention(img_size):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, img_size=img_size).eval()
    images = torch.randn(1, 3, img_size, img_size)
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    block = model.blocks[0].attn
    attention = len(model.blocks) * 4 * block.num_heads * tokens * tokens * block.head_dim  # QK^T and AV, 2 per MAC
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        math_path = _linear_flops(model, images)  # the math path is made of bmm/matmul: torch counts them
    assert benchmark.count_gflops(model, images) * 1e9 == pytest.approx(math_path)
    # and the default (flash) CPU kernel, which FlopCounterMode alone counts as 0, is now counted
    assert benchmark.count_gflops(model, images) * 1e9 == pytest.approx(_linear_flops(model, images) + attention)


def test_fpet_counts_fewer_flops_with_its_masked_attention():
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, img_size=64).eval()
    images = torch.randn(1, 3, 64, 64)
    base = benchmark.count_gflops(model, images)
    fpet = apply_fpet(add_pet(timm.create_model("test_vit", pretrained=False, img_size=64).eval(), "lora"))
    assert 0 < benchmark.count_gflops(fpet, images) < base
    assert benchmark.tokens_per_block(fpet, images)[-1] < benchmark.tokens_per_block(model, images)[-1]


def test_measure_throughput_round_robin():
    models = {"a": torch.nn.Identity(), "b": torch.nn.Identity()}
    times = benchmark.measure_throughput(models, torch.zeros(2, 3), runs=3, warmup=1, threads=1)
    assert set(times) == {"a", "b"} and all(len(v) == 3 and min(v) >= 0 for v in times.values())
    with pytest.raises(ValueError, match="runs must be >= 1"):
        benchmark.measure_throughput(models, torch.zeros(1), runs=0)
