"""The emulator as a measuring instrument (tests/cuda_emulation/traffic.h), validated on kernels whose traffic is
known: sectors per request of a coalesced and of a stride-32 copy, the bank conflicts of a naive and of a padded
shared-memory transpose, L2 re-reads, and a sampled count of a real DCN launch against the full count."""
import pytest
import torch

import emulation
from dcn_cases import Case
from test_cuda_emulation_dcn import problem

pytestmark = pytest.mark.slow

TEXTBOOK = ["strided_copy_kernel", "transpose_kernel<32>", "transpose_kernel<33>", "reread_kernel"]
BIG_L2 = 1 << 30


@pytest.fixture
def counter(emulated):
    table = emulation.resource_table()
    table.update({name: (32, 1024, 0) for name in TEXTBOOK})
    emulated.set_resources(table, True)

    def count(fn, *args, sample_blocks=0, l2=(BIG_L2,)):
        emulated.start_counting(sample_blocks, 132, list(l2))
        try:
            result = fn(*args)
        finally:
            emulated.stop_counting()
        return result, emulated.counted_launches()

    yield count
    emulated.set_resources(emulation.resource_table(), True)


def only(launches):
    assert len(launches) == 1, [t["kernel"] for t in launches]
    return launches[0]


def test_a_coalesced_fp32_copy_touches_4_sectors_a_request(counter, emulated):
    x = torch.arange(4096.0)
    out, launches = counter(emulated.strided_copy, x, 1)
    assert torch.equal(out, x)
    t = only(launches)
    assert t["load_requests"] == 4096 // 32 and t["load_sectors"] == 4 * t["load_requests"]
    assert t["store_requests"] == 4096 // 32 and t["store_sectors"] == 4 * t["store_requests"]
    # Nothing is read twice: the DRAM traffic is the compulsory traffic, the input read and the output written.
    assert t["distinct_sectors"] == 2 * 4096 * 4 // 32
    assert t["dram_sectors"] == [t["distinct_sectors"]]


def test_a_stride_32_copy_touches_32_sectors_a_request(counter, emulated):
    x = torch.arange(32 * 1024.0)
    out, launches = counter(emulated.strided_copy, x, 32)
    assert torch.equal(out, x[::32])
    t = only(launches)
    assert t["load_requests"] == 1024 // 32 and t["load_sectors"] == 32 * t["load_requests"]
    assert t["store_sectors"] == 4 * t["store_requests"]


@pytest.mark.parametrize("padded, wavefronts", [(False, 32), (True, 1)])
def test_a_transposes_column_reads_conflict_32_ways_unless_padded(counter, emulated, padded, wavefronts):
    x = torch.randn(64, 64)
    out, launches = counter(emulated.transpose, x, padded)
    assert torch.equal(out, x.t())
    t = only(launches)
    warps = 4 * 32  # 4 blocks of 32 warps
    # Each warp stores one tile row (1 wavefront) and reads one tile column (32 words in one bank, or in 32).
    assert t["shared_requests"] == 2 * warps
    assert t["shared_wavefronts"] == warps * (1 + wavefronts)
    assert t["load_sectors"] == 4 * t["load_requests"] and t["store_sectors"] == 4 * t["store_requests"]


def test_re_reads_that_miss_l2_count_as_dram_traffic(counter, emulated):
    blocks, chunk = 8, 4096
    x = torch.ones(blocks * chunk)
    sectors_in = blocks * chunk * 4 // 32
    sectors_out = blocks * 128 * 4 // 32
    # An L2 of 64 KB holds a warp's share of a chunk but not a wave's chunks (8 blocks, 128 KB): the second
    # pass misses. An L2 of 1 GB holds everything: only the first pass reaches DRAM.
    _, launches = counter(emulated.reread, x, blocks, 2, l2=(BIG_L2, 64 << 10))
    t = only(launches)
    big, small = t["dram_sectors"]
    assert t["distinct_sectors"] == sectors_in + sectors_out
    assert big == sectors_in + sectors_out
    assert small == 2 * sectors_in + sectors_out
    assert t["load_sectors"] == 2 * sectors_in  # every pass's sectors are L2 traffic (no L1 reuse assumed)


def test_a_sampled_count_scales_to_the_full_count(counter, emulated):
    # The simple path's sampling kernel on 2 images of 32 channels at 24 x 24: about 150 blocks. Counting 40
    # consecutive blocks and scaling by blocks / 40 must come within 15 % of counting all of them.
    case = Case(2, 32, 16, (24, 24), (3, 3), (1, 1), (1, 1), (1, 1), 1, 1, True, True)
    (x, offset, weight, bias, mask), geometry = problem(case, torch.float32)
    run = lambda: emulated.dcn_forward(x, weight, offset, mask, bias, *geometry, "simple", 1 << 30)  # noqa: E731
    _, full = counter(run)
    _, sampled = counter(run, sample_blocks=40)
    kernels = [t for t in full if t["blocks"] > 40]
    assert kernels, "no launch large enough to sample"
    for f in kernels:
        s = next(t for t in sampled if t["kernel"] == f["kernel"])
        assert s["blocks_counted"] == 40 and f["blocks_counted"] == f["blocks"]
        scale = s["blocks"] / s["blocks_counted"]
        for key in ("load_requests", "load_sectors", "store_requests", "store_sectors", "distinct_sectors",
                    "fp32_flops"):
            assert s[key] * scale == pytest.approx(f[key], rel=0.15), (f["kernel"], key)
        assert s["dram_sectors"][0] * scale == pytest.approx(f["dram_sectors"][0], rel=0.15)


# ---- the committed model (benchmarks/cuda_model.json) --------------------------------------------------------

def committed_model():
    import json
    import os
    with open(os.path.join(emulation.ROOT, "benchmarks", "cuda_model.json")) as f:
        return json.load(f)


def test_the_committed_model_has_the_issues_shape():
    model = committed_model()
    assert set(model["devices"]) == {"H100 SXM", "H200"}
    for device in model["devices"].values():
        assert device["dram_tbps"] > 0 and device["bf16_tensor_tflops"] > 0 and device["l2_bytes"] > 0
    cases = model["cases"]
    keys = {(c["op"], c["path"], c["pass"], c["dtype"]) for c in cases}
    for op, path in (("deform_conv2d", "simple"), ("deform_conv2d", "implicit"), ("conv2d", "cudnn")):
        for pass_ in ("forward", "backward"):
            for dtype in ("float32", "float16", "bfloat16"):
                assert (op, path, pass_, dtype) in keys
    for c in cases:
        assert c["shape"] == "16x256x64x64"
        assert c["launches"] >= 1
        assert 0 < c["compulsory_bytes"] <= c["dram_bytes"] * 1.0001  # every distinct sector reaches DRAM once
        assert set(c["predicted_ms"]) == {"H100 SXM", "H200"}
        # The H200 has the H100's compute and more bandwidth: never slower.
        assert c["predicted_ms"]["H200"] <= c["predicted_ms"]["H100 SXM"] * 1.0001


def test_the_committed_validation_holds():
    rows = committed_model()["validation"]
    assert {r["kernel"] for r in rows} >= {"coalesced fp32 copy", "stride-32 fp32 copy",
                                           "naive shared-memory transpose", "padded shared-memory transpose"}
    for r in rows:
        if r["quantity"] == "TFLOPS":  # the GEMM model against a published cuBLAS figure: within 20 %
            assert r["value"] == pytest.approx(r["expected"], rel=0.20), r
        else:
            assert r["value"] == r["expected"], r
    assert any(r["quantity"] == "TFLOPS" and "H100" in r["kernel"] for r in rows)
