"""A small deform_conv2d workload for `compute-sanitizer --tool memcheck` (run by gpu_check.py).

Covers every CUDA kernel: forward, backward with atomics and the deterministic backward, fp32 and bf16, weight
and offset groups, with and without a mask, and offsets that are huge, non-finite or far outside the image.
"""
import torch

import aecr_ops


def run(dtype, deterministic, use_mask):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 7, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, device="cuda", dtype=dtype, requires_grad=True)
    offset = (4 * torch.randn(2, 2 * 2 * 9, 9, 7, device="cuda")).to(dtype)
    offset[0, 0, 0, 0] = float("nan")
    offset[1, 1, 2, 3] = float("inf")
    offset[0, 3, 4, 4] = -1e30
    offset.requires_grad_(True)
    mask = torch.rand(2, 2 * 9, 9, 7, device="cuda", dtype=dtype, requires_grad=True) if use_mask else None
    b = torch.randn(6, device="cuda", dtype=dtype, requires_grad=True)
    torch.use_deterministic_algorithms(deterministic)
    try:
        out = aecr_ops.deform_conv2d(x, offset, w, b, padding=1, mask=mask)
        out.float().square().sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    torch.cuda.synchronize()


if __name__ == "__main__":
    for dtype in (torch.float32, torch.bfloat16):
        for deterministic in (False, True):
            for use_mask in (True, False):
                run(dtype, deterministic, use_mask)
    print("sanitizer case done")
