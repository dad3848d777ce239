"""Each check of the CUDA emulator, shown by a deliberately broken kernel (tests/cuda_emulation/broken_kernels.cpp)
that it catches and the correct twin that it lets pass: shared- and global-memory races, accesses outside a
tensor or a __shared__ array, reads of shared memory the block has not written, barriers in divergent code (an
error that names the kernel, not a hang), and launches over the hardware's limits."""
import math
import re

import pytest
import torch

import emulation

pytestmark = pytest.mark.slow

TEST_KERNELS = ["write_then_read_kernel", "read_then_write_kernel", "warp_ops_kernel", "cross_block_kernel", "wmma_kernel", "write_write_kernel", "missing_loop_barrier_kernel", "accumulate_kernel",
                "per_block_write_kernel", "copy_kernel", "fill_kernel", "mixed_width_kernel", "shared_index_kernel", "partial_fill_kernel",
                "barrier_kernel", "shuffle_after_return_kernel", "static_shared_kernel<49152>",
                "static_shared_kernel<49156>", "dynamic_shared_kernel", "resource_kernel"]


@pytest.fixture
def checked(emulated):
    """The emulator with the real kernels' resources and modest ones for the test kernels (strict: a kernel
    without an entry may not launch)."""
    table = emulation.resource_table()
    table.update({name: (32, 1024, 0) for name in TEST_KERNELS})
    emulated.set_resources(table, True)
    yield emulated
    emulated.set_resources(emulation.resource_table(), True)


def fails(fn, *args, match):
    """fn(*args) raises a RuntimeError whose message (several lines: one a problem) matches `match`."""
    with pytest.raises(RuntimeError, match=re.compile(match, re.S)):
        fn(*args)


# ---- races ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reader", [5, 32])
def test_a_read_after_another_threads_write_needs_a_barrier(checked, reader):
    fails(checked.write_then_read, 64, reader, 0, match=r"write_then_read_kernel.*shared-memory race.*thread "
                                                       rf"\({reader},0,0\) reads .* that thread \(0,0,0\) wrote")
    assert checked.write_then_read(64, reader, 1).item() == 1.0  # __syncthreads orders them


def test_syncwarp_orders_only_the_lanes_of_its_warp(checked):
    assert checked.write_then_read(64, 5, 2).item() == 1.0  # __syncwarp: lane 5 after lane 0
    fails(checked.write_then_read, 64, 32, 2, match="shared-memory race.*thread \\(32,0,0\\) reads")


def test_a_shuffle_does_not_order_memory(checked):
    # Review E1: only __syncwarp and barriers order memory between lanes; a shuffle exchanges registers.
    fails(checked.write_then_read, 64, 5, 3, match=r"shared-memory race.*thread \(5,0,0\) reads .* that thread "
                                                   r"\(0,0,0\) wrote")


def test_a_partial_syncwarp_orders_only_the_lanes_of_its_mask(checked):
    # Review E2: lanes 0-15 synchronise; lane 5 is ordered after lane 0's write, lane 20 is not.
    assert checked.write_then_read(64, 5, 4).item() == 1.0
    fails(checked.write_then_read, 64, 20, 4, match=r"shared-memory race.*thread \(20,0,0\) reads .* that thread "
                                                    r"\(0,0,0\) wrote")


def test_a_write_after_reads_names_the_reader_its_syncwarp_left_out(checked):
    # Lanes 0 and 1 read; a __syncwarp of lanes 0 and 2 leaves out lane 1, whose read then races with lane 2's
    # write (review E9: the message named the last reader, not the unordered one).
    assert checked.read_then_write(0b111).tolist() == [1.0, 1.0]
    fails(checked.read_then_write, 0b101, match=r"read_then_write_kernel.*shared-memory race.*thread \(2,0,0\) "
                                                r"writes .* that thread \(1,0,0\) read")


def test_a_launch_counts_only_once_it_completed(checked):
    # The coverage check (test_cuda_emulation_coverage.py) counts launches: one that a check stopped must not count.
    before = checked.launched().get("copy_kernel", 0)
    x = torch.arange(40, dtype=torch.float32)
    fails(checked.copy, x, 64, match="out of bounds")
    assert checked.launched().get("copy_kernel", 0) == before
    checked.copy(x, 0)
    assert checked.launched()["copy_kernel"] == before + 1


def test_two_writes_of_one_address_race(checked):
    fails(checked.write_write, True, match=r"shared-memory race.*writes .* that thread \(0,0,0\) wrote")
    assert checked.write_write(False).tolist() == [float(i) for i in range(64)]


def test_a_loop_missing_its_barrier_races_with_the_previous_round(checked):
    fails(checked.missing_loop_barrier, True, match="missing_loop_barrier_kernel.*shared-memory race.* read with no "
                                                    "barrier between")
    expected = [float((t + 1) % 64 + (t + 1) % 64 + 1) for t in range(64)]
    assert checked.missing_loop_barrier(False).tolist() == expected


def test_plain_adds_race_within_and_between_blocks_atomics_do_not(checked):
    fails(checked.accumulate, 1, 32, False, match=r"global-memory race: kernel accumulate_kernel, block \(0,0,0\)")
    fails(checked.accumulate, 3, 1, False, match="global-memory race.*another block of the launch")
    assert checked.accumulate(3, 32, True).item() == 96.0


def test_blocks_writing_one_element_race(checked):
    fails(checked.per_block_write, True, match="global-memory race.*another block of the launch wrote")
    assert checked.per_block_write(False).tolist() == [0.0, 1.0, 2.0, 3.0]


def test_overlapping_accesses_of_different_widths_are_compared_byte_by_byte(checked):
    # A double written by one block and the float in its upper half read by another share bytes 4-7 but not a
    # start address; a float and the bf16-sized half of it share bytes 2-3.
    fails(checked.mixed_width, 1, match=r"mixed_width_kernel, block \(1,0,0\), thread \(0,0,0\) reads kernel "
                                        r"argument #2 \(byte 4 of its tensor's 16\) that another block of the "
                                        r"launch wrote")
    fails(checked.mixed_width, 3, match=r"mixed_width_kernel, block \(1,0,0\), thread \(0,0,0\) writes kernel "
                                        r"argument #3 \(byte 2 of its tensor's 16\) that another block of the "
                                        r"launch wrote")
    # The twins touch neighbouring bytes only: adjacent 16-bit halves of one word do not race.
    assert checked.mixed_width(0).view(torch.float64)[0].item() == 1.0
    assert checked.mixed_width(2).view(torch.int16)[:2].tolist() == [1, 1]


# ---- bounds -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shift", [1, -1])
def test_an_access_outside_its_tensor_stops_the_launch(checked, shift):
    x = torch.arange(40.0)
    fails(checked.copy, x, shift, match=r"copy_kernel.*out of bounds: .* reads 4 bytes at byte "
                                        rf"{160 if shift == 1 else -4} of kernel argument #2, whose tensor has 160")
    assert torch.equal(checked.copy(x, 0), x)


def test_an_index_past_a_shared_array_stops_the_launch(checked):
    fails(checked.shared_index, True, match=r"shared_index_kernel.*index 32 outside \[0, 32\) of __shared__ array #0")
    assert checked.shared_index(False).tolist() == [1.0] * 32


# ---- initialisation ---------------------------------------------------------------------------------------------

def test_reading_shared_memory_the_block_has_not_written_is_an_error(checked):
    out = torch.zeros(2 * 64)
    fails(checked.partial_fill, 2, 16, out, match=r"uninitialised shared memory: kernel partial_fill_kernel, block "
                                                  r"\(1,0,0\), thread \(16,0,0\) reads __shared__ array #0 \(byte 64")
    checked.partial_fill(2, 64, out)
    assert out.tolist() == [2.0] * 128


def test_a_read_of_a_workspace_no_kernel_wrote_is_an_error(checked):
    fails(checked.read_workspace, 0, match=r"uninitialised global memory: kernel copy_kernel, block \(0,0,0\), "
                                           r"thread \(0,0,0\) reads kernel argument #2 \(byte 0 of its tensor's "
                                           r"128\), which no kernel has written since it was allocated")
    fails(checked.read_workspace, 3, match=r"uninitialised global memory: .* thread \(16,0,0\) reads kernel "
                                           r"argument #2 \(byte 64 of")
    # Filled by an earlier launch, or by the host: no error.
    assert checked.read_workspace(1).tolist() == [float(i) for i in range(32)]
    assert checked.read_workspace(2).tolist() == [0.0] * 32


def test_workspaces_are_poisoned_when_allocated(checked):
    empty = checked.poisoned_empty(64)
    assert torch.isnan(empty).all()
    assert (empty.view(torch.uint8) == 0xFF).all()


def test_shared_memory_is_poisoned_before_every_block(checked):
    # Block 0 filled the whole tile; what block 1 then read of the part it did not fill is the poison (0xFF
    # bytes: NaN), not block 0's values nor zeros.
    out = torch.zeros(2 * 64)
    with pytest.raises(RuntimeError, match="uninitialised shared memory"):
        checked.partial_fill(2, 16, out)
    assert out[:64 + 16].tolist() == [2.0] * (64 + 16)
    assert torch.isnan(out[64 + 16:]).all()


# ---- barriers ---------------------------------------------------------------------------------------------------

def test_a_barrier_that_half_the_block_skips_is_an_error_naming_the_kernel(checked):
    fails(checked.barrier, 1, match=r"kernel barrier_kernel:.*__syncthreads at broken_kernels.cpp:\d+ reached by 16 "
                                    r"of 32 threads \(16 returned")
    fails(checked.barrier, 2, match="kernel barrier_kernel:.*threads wait at different __syncthreads")
    assert checked.barrier(0).tolist() == [1.0] * 32


def test_barriers_behind_a_wrapper_are_told_apart_by_their_call_sites(checked):
    # Review E5: the Newton-Schulz kernels' BlockSync gave every barrier behind it one source location.
    fails(checked.barrier, 3, match=r"kernel barrier_kernel:.*threads wait at different __syncthreads "
                                    r"\(broken_kernels.cpp:\d+ and broken_kernels.cpp:\d+\)")
    assert checked.barrier(4).tolist() == [1.0] * 32


def test_a_shuffle_after_some_lanes_returned_is_an_error(checked):
    fails(checked.shuffle_after_return, True, match="shuffle_after_return_kernel.*16 threads wait at a warp operation "
                                                    "that lanes of their warp never reach")
    assert checked.shuffle_after_return(False).tolist() == [float(t ^ 1) for t in range(32)]


# ---- launch limits ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid,block,message", [
    ([1, 1, 1], [1025, 1, 1], "1025 threads per block"),
    ([1, 65536, 1], [32, 1, 1], "y and z at most 65535"),
    ([1, 1, 65536], [32, 1, 1], "y and z at most 65535"),
    ([1, 1, 1], [1, 1, 65], "block dimensions"),
])
def test_a_launch_over_cudas_limits_is_refused(checked, grid, block, message):
    fails(checked.launch_shape, grid, block, match=f"resource_kernel: invalid launch: .*{message}")
    assert checked.launch_shape([2, 1, 1], [1024, 1, 1]).sum().item() == 2048


def test_static_shared_memory_above_48_kb_is_refused(checked):
    fails(checked.static_shared, True, match=r"static_shared_kernel<49156>.*49156 bytes of static shared memory")
    assert checked.static_shared(False).tolist() == [1.0] * 32


def test_dynamic_shared_memory_above_48_kb_needs_the_attribute(checked):
    fails(checked.dynamic_shared, 64 << 10, 0, match="dynamic_shared_kernel: invalid launch: 65536 bytes of dynamic "
                                                   "shared memory.*cudaFuncAttributeMaxDynamicSharedMemorySize")
    assert checked.dynamic_shared(64 << 10, 64 << 10).item() == (64 << 10) // 4 - 1
    assert checked.dynamic_shared(16 << 10, 0).item() == (16 << 10) // 4 - 1


def test_threads_times_registers_must_fit_the_register_file(checked):
    table = {**emulation.resource_table(), "resource_kernel": (128, 1024, 0)}
    checked.set_resources(table, True)
    fails(checked.launch_shape, [1, 1, 1], [1024, 1, 1], match="1024 threads x 128 registers = 131072 registers")
    assert checked.launch_shape([1, 1, 1], [512, 1, 1]).sum().item() == 512
    # Registers are allocated per warp in units of 256: 65 registers take 72 a thread.
    table["resource_kernel"] = (65, 1024, 0)
    checked.set_resources(table, True)
    threads = 32 * math.floor(65536 / (72 * 32))
    assert checked.launch_shape([1, 1, 1], [threads, 1, 1]).sum().item() == threads
    fails(checked.launch_shape, [1, 1, 1], [threads + 32, 1, 1], match="registers per block")


def test_a_launch_above_the_kernels_launch_bounds_is_refused(checked):
    checked.set_resources({**emulation.resource_table(), "resource_kernel": (32, 256, 0)}, True)
    fails(checked.launch_shape, [1, 1, 1], [512, 1, 1], match=r"512 threads per block above its __launch_bounds__\(256\)")
    assert checked.launch_shape([1, 1, 1], [256, 1, 1]).sum().item() == 256


def test_a_kernel_the_resource_table_does_not_know_may_not_launch(emulated):
    fails(emulated.write_write, False, match="write_write_kernel: invalid launch: no resource usage known")


# ---- warp operations and WMMA (review E6, E8) -------------------------------------------------------------------

def test_a_shuffle_from_a_lane_outside_its_mask_is_an_error(checked):
    assert checked.warp_ops(0).tolist()[:16] == [5.0] * 16
    fails(checked.warp_ops, 1, match=r"warp_ops_kernel.*a shuffle reads lane 20 outside its mask")


def test_lanes_at_different_warp_operations_are_an_error(checked):
    fails(checked.warp_ops, 2, match=r"warp_ops_kernel.*lanes of warp 0 wait at different warp operations "
                                     r"\(broken_kernels.cpp:\d+ and broken_kernels.cpp:\d+\)")
    assert checked.warp_ops(3).tolist() == [float(i) for i in range(32)]


def test_a_write_after_another_blocks_read_races(checked):
    fails(checked.cross_block, True, match=r"cross_block_kernel.*global-memory race.*another block of the launch "
                                           r"read")
    assert checked.cross_block(False).item() == 1.0


def test_wmma_is_collective_and_each_lane_stores_its_share(checked):
    assert checked.wmma(0, 0).item() == 8.0
    assert checked.wmma(1, 5).item() == 8.0  # lane 5 reads what it stored itself
    # Lane 0 reads before lane 5 has stored (the lanes run in order): the race shows at lane 5's store.
    fails(checked.wmma, 1, 0, match=r"wmma_kernel.*shared-memory race.*thread \(5,0,0\) writes .* that thread "
                                    r"\(0,0,0\) read")
    fails(checked.wmma, 2, 0, match=r"wmma_kernel.*lanes of warp 0 wait at different warp operations")


@pytest.mark.parametrize("mode, message", [(3, "load_matrix_sync: pointer not 256-bit aligned"),
                                           (4, "load_matrix_sync: ldm not a multiple of 16 bytes")])
def test_wmma_refuses_a_misaligned_tile_or_ldm(checked, mode, message):
    fails(checked.wmma, mode, 0, match=rf"wmma_kernel.*{message}")
