"""The work a benchmark does, as the suite records it in ``extra_info``: GFLOP, megapixels and images.

FLOPs come from the cost model: ``torch.utils.flop_counter`` (2 FLOPs per multiply-accumulate) with the formulas
of aecr's custom ops registered by ``aecr_ops.flops`` (DCN forward and backward, honouring which gradients are
asked for; FastDeconv's patch statistics and Newton-Schulz). The count runs under FakeTensorMode, so nothing is
computed; a call whose control flow reads tensor values (FastDeconv's training step checks its statistics) is
counted by running it once for real, outside the timing.

A problem's work is counted on aecr's implementation, and a baseline that solves the same problem (torchvision's
deform_conv2d, the original FastDeconv, the network built on them) is credited with the same work, so that
GFLOP/s compare like with like; conv2d, a different and smaller problem, is credited with its own count.
"""
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import aecr_ops.flops  # noqa: F401 - registers the custom ops' formulas with flop_counter


def count_gflop(fn):
    """GFLOP of one fn() call, by torch.utils.flop_counter. fn must not share a module with a call timed later:
    under FakeTensorMode a module's cache (FastDeconv's folded weight in eval) would keep fake tensors."""
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), FlopCounterMode(display=False) as counter:
            fn()
    except Exception:  # noqa: BLE001 - data-dependent code (or any other refusal of fake tensors): count for real
        with FlopCounterMode(display=False) as counter:
            fn()
    return counter.get_total_flops() / 1e9


def record_work(benchmark, *, gflop, images, pixels_per_image):
    """Writes the work of one call into the benchmark's extra_info (rates follow at the end of the session)."""
    benchmark.extra_info.update(gflop=gflop, images=images, megapixels=images * pixels_per_image / 1e6)

