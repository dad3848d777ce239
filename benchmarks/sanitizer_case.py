"""A small workload for `compute-sanitizer --tool memcheck` (run by gpu_check.py) that runs every CUDA kernel.

deform_conv2d: both CUDA paths (simple; implicit GEMM with TF32 allowed), forward, backward with atomics and the
deterministic backward, fp32 and bf16, weight and offset groups, with and without a mask, offsets that are huge,
non-finite or far outside the image, channel counts that leave partial tiles. FastDeconv: patch statistics (the
two-launch form and the tiled one for F > 64) and their backward (unfold and 1x1 modes, interleaved blocks,
groups), Newton-Schulz in matrix and spectral form with their backward.
"""
import os

import torch

import aecr_ops


def run(dtype, deterministic, use_mask):
    torch.manual_seed(0)
    x = torch.randn(2, 40, 9, 7, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(70, 20, 3, 3, device="cuda", dtype=dtype, requires_grad=True)
    offset = (4 * torch.randn(2, 2 * 2 * 9, 9, 7, device="cuda")).to(dtype)
    offset[0, 0, 0, 0] = float("nan")
    offset[1, 1, 2, 3] = float("inf")
    offset[0, 3, 4, 4] = -1e30
    offset.requires_grad_(True)
    mask = torch.rand(2, 2 * 9, 9, 7, device="cuda", dtype=dtype, requires_grad=True) if use_mask else None
    b = torch.randn(70, device="cuda", dtype=dtype, requires_grad=True)
    torch.use_deterministic_algorithms(deterministic)
    try:
        out = aecr_ops.deform_conv2d(x, offset, w, b, padding=1, mask=mask)
        out.float().square().sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    torch.cuda.synchronize()


def run_fastdeconv():
    for kernel, channels, block, groups in ((3, 3, 3, 1), (3, 12, 4, 1), (1, 8, 4, 1), (3, 8, 4, 2), (3, 16, 8, 1)):
        x = torch.randn(2, channels, 11, 13, device="cuda", dtype=torch.float64, requires_grad=True)
        mean, cov = aecr_ops.patch_statistics(x, kernel, 1, kernel // 2, 3, block, groups, 1e-5)
        deconv = aecr_ops.isqrt_newton_schulz(cov, 5)
        (mean.sum() + deconv.sum()).backward()
    a = torch.randn(2, 60, 90, device="cuda")
    a = (a @ a.transpose(1, 2) / 90).requires_grad_(True)
    aecr_ops.isqrt_newton_schulz(a, 5).sum().backward()
    layer = aecr_ops.FastDeconv(3, 3, 3, padding=1).cuda()
    layer(torch.rand(2, 3, 32, 32, device="cuda")).sum().backward()
    torch.cuda.synchronize()


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = True
    for path in ("simple", "implicit"):
        os.environ["AECR_DCN_CUDA_PATH"] = path
        for dtype in (torch.float32, torch.bfloat16):
            for deterministic in (False, True):
                for use_mask in (True, False):
                    run(dtype, deterministic, use_mask)
    run_fastdeconv()
    print("sanitizer case done")
