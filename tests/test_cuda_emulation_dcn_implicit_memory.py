"""Review R3: the implicit CUDA path does not chunk (its sample plan, partial sums, channels-last copy and float32
accumulator grow with the batch and the image), so implicit_path_applies declines a problem whose workspace bound
exceeds kImplicitWorkspaceBudget (1 GiB) and the simple path, which chunks, takes it. Here: the bound is above
what the emulated path allocates, and it declines a 4K image while it takes AECR-Net's layer."""
import pytest
import torch

from dcn_cases import Case

pytestmark = pytest.mark.slow

ALL_GRADS = (True, True, True, True, True)


def meta_problem(batch, channels, height, width, dtype=torch.bfloat16):
    x = torch.empty(batch, channels, height, width, device="meta", dtype=dtype)
    w = torch.empty(channels, channels, 3, 3, device="meta", dtype=dtype)
    o = torch.empty(batch, 18, height, width, device="meta", dtype=torch.float32)
    m = torch.empty(batch, 9, height, width, device="meta", dtype=torch.float32)
    return x, w, o, m, [1, 1], [1, 1], [1, 1], 1, 1


def test_the_bound_takes_aecr_nets_layer_and_declines_a_4k_image(emulated):
    budget = emulated.implicit_workspace_budget()
    assert budget == 1 << 30
    assert emulated.implicit_workspace(*meta_problem(16, 256, 64, 64)) < budget
    assert emulated.implicit_workspace(*meta_problem(1, 256, 2160, 3840)) > budget


def allocated_bytes(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0), result


@pytest.mark.parametrize("deterministic", [False, True])
def test_the_bound_covers_what_the_implicit_path_allocates(emulated, deterministic):
    case = Case(2, 40, 24, (10, 12), (3, 3), (1, 1), (1, 1), (1, 1), 1, 2, True, True)
    x, o, w, b, m = [t.to(torch.bfloat16) for t in case.tensors(dtype=torch.float32, seed=4)]
    o, m = o.float(), m.float()
    geometry = [list(case.stride), list(case.padding), list(case.dilation), 1, case.offset_groups]
    grad = torch.randn(2, 24, 10, 12).to(torch.bfloat16)
    bound = emulated.implicit_workspace(x, w, o, m, *geometry)
    forward, out = allocated_bytes(lambda: emulated.dcn_forward(x, w, o, m, b, *geometry, "implicit", 0))
    backward, grads = allocated_bytes(lambda: emulated.dcn_backward(grad, x, w, o, m, *geometry, "implicit",
                                                                    deterministic, 1 << 28, ALL_GRADS))
    results = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    # The deterministic input gradient goes through a column-gradient chunk within its own (column) budget, and
    # sorts 4 entries a sampling site: keys and weights, then the sorted keys and their order.
    entries = 4 * 2 * case.offset_groups * 9 * 10 * 12
    chunked = (40 * 9 * 2 * 10 * 12 * 2 + entries * (8 + 4 + 8 + 8)) if deterministic else 0
    slack = 64 * 1024  # small tensors
    assert forward - results([out]) <= bound + slack, (forward, bound)
    assert backward - results(grads) <= bound + chunked + slack, (backward, bound)
