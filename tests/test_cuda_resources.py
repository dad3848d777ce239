"""The committed CUDA resource table (benchmarks/cuda_resources.json) against the sources, and the parsers behind it.

Needs no nvcc: the table is made by `python benchmarks/cuda_resources.py` (which compiles the device code of every
csrc/cuda/*.cu); CI regenerates it with `--check`. Here: the table describes the current csrc/, every declared
kernel is in it for every architecture of setup.py's DEFAULT_ARCH_LIST, and every kernel keeps the limits (no
spills, a launch bound, registers and static shared memory that fit a block).
"""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("cuda_resources", os.path.join(ROOT, "benchmarks", "cuda_resources.py"))
cr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cr)

REGENERATE = "regenerate with `python benchmarks/cuda_resources.py`"

# Captured from `python benchmarks/cuda_resources.py --log-dir ...` (nvcc 13.0.88, -Xptxas -v; lines of
# fastdeconv_cuda.cu and deform_conv_implicit.cu, the latter's sm_75 kernels being the empty pre-sm_80 bodies).
REAL_PTXAS = """\
ptxas info    : 28 bytes gmem, 224 bytes cmem[4]
ptxas info    : Compiling entry function '_ZN4aecr56_GLOBAL__N__782da371_18_fastdeconv_cuda_cu_e42e1024_651621running_update_kernelIfEEvPT_S3_PKS2_S5_llS2_S2_Pb' for 'sm_75'
ptxas info    : Function properties for _ZN4aecr56_GLOBAL__N__782da371_18_fastdeconv_cuda_cu_e42e1024_651621running_update_kernelIfEEvPT_S3_PKS2_S5_llS2_S2_Pb
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 1 barriers, 4 bytes smem, 416 bytes cmem[0]
ptxas info    : Compile time = 4.747 ms
ptxas info    : Compiling entry function '_ZN4aecr56_GLOBAL__N__782da371_18_fastdeconv_cuda_cu_e42e1024_651621running_update_kernelIdEEvPT_S3_PKS2_S5_llS2_S2_Pb' for 'sm_75'
ptxas info    : Function properties for _ZN4aecr56_GLOBAL__N__782da371_18_fastdeconv_cuda_cu_e42e1024_651621running_update_kernelIdEEvPT_S3_PKS2_S5_llS2_S2_Pb
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 14 registers, used 1 barriers, 4 bytes smem, 424 bytes cmem[0]
ptxas info    : Compile time = 3.617 ms
ptxas info    : Compiling entry function '_ZN4aecr56_GLOBAL__N__782da371_18_fastdeconv_cuda_cu_e42e1024_651620patch_moments_kernelIdEEvNS_10PatchShapeElPKT_PN2at10OpMathTypeIS3_E4typeE' for 'sm_80'
ptxas info    : Function properties for _ZN4aecr56_GLOBAL__N__782da371_18_fastdeconv_cuda_cu_e42e1024_651620patch_moments_kernelIdEEvNS_10PatchShapeElPKT_PN2at10OpMathTypeIS3_E4typeE
    8 bytes stack frame, 16 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 80 registers, used 1 barriers, 8 bytes cumulative stack size, 16896 bytes smem, 512 bytes cmem[0], 8 bytes cmem[2]
ptxas info    : Compile time = 148.769 ms
ptxas info    : Compiling entry function '_ZN4aecr56_GLOBAL__N__a1b0a2fe_23_deform_conv_implicit_cu_bcc7024414forward_kernelIfEEvNS_15DeformConvShapeENS0_8GeometryEPKT_PKNS0_10SamplePlanES6_S6_PS4_' for 'sm_75'
ptxas info    : Function properties for _ZN4aecr56_GLOBAL__N__a1b0a2fe_23_deform_conv_implicit_cu_bcc7024414forward_kernelIfEEvNS_15DeformConvShapeENS0_8GeometryEPKT_PKNS0_10SamplePlanES6_S6_PS4_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 4 registers, used 0 barriers, 536 bytes cmem[0]
ptxas info    : Compile time = 0.468 ms
ptxas info    : Compiling entry function '_ZN4aecr56_GLOBAL__N__a1b0a2fe_23_deform_conv_implicit_cu_bcc7024417sum_splits_kernelEPKfllPf' for 'sm_75'
ptxas info    : Function properties for _ZN4aecr56_GLOBAL__N__a1b0a2fe_23_deform_conv_implicit_cu_bcc7024417sum_splits_kernelEPKfllPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers, 384 bytes cmem[0]
ptxas info    : Compile time = 7.390 ms
"""

# Captured from nvcc 13.0.88 -Xptxas -v on a small file with a __noinline__ device function: ptxas reports the
# device function's properties after the entry that calls it.
CALLEE_PTXAS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z12plain_kernelPf' for 'sm_80'
ptxas info    : Function properties for _Z12plain_kernelPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers, 360 bytes cmem[0]
ptxas info    : Compile time = 1.735 ms
ptxas info    : Compiling entry function '_Z14bounded_kernelPKfPfi' for 'sm_80'
ptxas info    : Function properties for _Z14bounded_kernelPKfPfi
    64 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 36 registers, used 0 barriers, 64 bytes cumulative stack size, 372 bytes cmem[0]
ptxas info    : Compile time = 2.233 ms
ptxas info    : Function properties for _Z6helperPKfi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""

# Captured from the kept PTX of fastdeconv_cuda.cu for sm_80 (header lines and two entries, bodies cut), and of
# the small file above (__launch_bounds__(128, 4)).
REAL_PTX = """\
//
// Generated by NVIDIA NVVM Compiler
//
// Compiler Build ID: CL-36424714
// Cuda compilation tools, release 13.0, V13.0.88
// Based on NVVM 7.0.1
//

.version 9.0
.target sm_80
.address_size 64

// _ZZN4aecr56_GLOBAL__N__782da371_18_fastdeconv_cuda_cu_e42e1024_443421running_update_kernelIfEEvPT_S3_PKS2_S5_llS2_S2_PbE3bad has been demoted
.entry _ZN4aecr56_GLOBAL__N__782da371_18_fastdeconv_cuda_cu_e42e1024_443417ns_forward_kernelIdEEvPKT_S4_PS2_S5_ll(
	.param .u64 _ZN4aecr56_GLOBAL__N__782da371_18_fastdeconv_cuda_cu_e42e1024_443417ns_forward_kernelIdEEvPKT_S4_PS2_S5_ll_param_0,
	.param .u64 _ZN4aecr56_GLOBAL__N__782da371_18_fastdeconv_cuda_cu_e42e1024_443417ns_forward_kernelIdEEvPKT_S4_PS2_S5_ll_param_5
)
{
	.reg .pred 	%p<43>;
}
.entry _ZN4aecr56_GLOBAL__N__782da371_18_fastdeconv_cuda_cu_e42e1024_443421running_update_kernelIdEEvPT_S3_PKS2_S5_llS2_S2_Pb(
	.param .u64 _ZN4aecr56_GLOBAL__N__782da371_18_fastdeconv_cuda_cu_e42e1024_443421running_update_kernelIdEEvPT_S3_PKS2_S5_llS2_S2_Pb_param_0,
	.param .u64 _ZN4aecr56_GLOBAL__N__782da371_18_fastdeconv_cuda_cu_e42e1024_443421running_update_kernelIdEEvPT_S3_PKS2_S5_llS2_S2_Pb_param_8
)
.maxntid 256, 1, 1
{
	.reg .pred 	%p<16>;
}
.visible .entry _Z14bounded_kernelPKfPfi(
	.param .u64 _Z14bounded_kernelPKfPfi_param_0,
	.param .u64 _Z14bounded_kernelPKfPfi_param_1,
	.param .u32 _Z14bounded_kernelPKfPfi_param_2
)
.maxntid 128, 1, 1
.minnctapersm 4
{
}
"""


@pytest.fixture(scope="module")
def table():
    path = os.path.join(ROOT, "benchmarks", cr.JSON_NAME)
    assert os.path.isfile(path), f"benchmarks/{cr.JSON_NAME} is missing: {REGENERATE}"
    return cr.load_table()


# ---- the committed table ----------------------------------------------------------------------------------------

def test_table_describes_the_current_sources(table):
    assert table["sources_sha256"] == cr.sources_sha256(), f"csrc/ changed since the table was made: {REGENERATE}"


def test_table_covers_setup_archs(table):
    archs = cr.default_archs()
    assert table["archs"] == archs, f"setup.py's DEFAULT_ARCH_LIST is {archs}, the table has {table['archs']}: " \
                                    f"{REGENERATE}"


def test_every_declared_kernel_is_in_the_table_and_back(table):
    problems = cr.coverage_problems(table, archs=cr.default_archs())
    assert not problems, "\n".join(problems)


def test_kernels_keep_the_limits(table):
    problems = cr.limit_problems(table, archs=cr.default_archs())
    assert not problems, f"{len(problems)} problems (benchmarks/{cr.MD_NAME} lists them too):\n" + "\n".join(problems)


# Review R8: the latency-bound sampling kernels of deform_conv2d, which ran 2 blocks of 256 threads per SM (80-121
# registers a thread under a launch bound of 1 block), fit 3 blocks of 256 threads for 2- and 4-byte types and 2
# for double; the atomic scatter 2.
SAMPLING_KERNELS = ("im2col_kernel", "offset_mask_grad_kernel", "scatter_entries_kernel", "gather_entries_kernel",
                    "implicit_sample_plan_kernel", "implicit_offset_mask_grad_kernel", "col2im_atomic_kernel")


def test_sampling_kernels_fit_several_blocks_per_multiprocessor(table):
    checked = 0
    for name, entry in table["kernels"].items():
        base = name.split("<")[0]
        if base not in SAMPLING_KERNELS:
            continue
        blocks = 2 if "double" in name or base == "col2im_atomic_kernel" else 3
        for arch, row in entry.items():
            if not arch.startswith("sm_"):
                continue
            checked += 1
            assert blocks * cr.block_registers(row["registers"], 256) <= 65536, (name, arch, row["registers"])
            assert row["min_blocks_per_sm"] == blocks, (name, arch, row["min_blocks_per_sm"])
            assert row["spill_store_bytes"] == 0 and row["spill_load_bytes"] == 0, (name, arch)
    assert checked >= 3 * 15, checked


def test_markdown_is_rendered_from_the_json(table):
    with open(os.path.join(ROOT, "benchmarks", cr.MD_NAME)) as f:
        assert f.read() == cr.render_markdown(table), f"benchmarks/{cr.MD_NAME} is not the JSON's table: {REGENERATE}"


# ---- parsers ----------------------------------------------------------------------------------------------------

def _find(parsed, name_part, arch):
    matches = [usage for (mangled, a), usage in parsed.items() if name_part in mangled and a == arch]
    assert len(matches) == 1, (name_part, arch, list(parsed))
    return matches[0]


def test_parse_ptxas_on_real_output():
    parsed = cr.parse_ptxas(REAL_PTXAS)
    assert len(parsed) == 5
    assert _find(parsed, "running_update_kernelIfE", "sm_75") == {
        "registers": 12, "stack_bytes": 0, "spill_store_bytes": 0, "spill_load_bytes": 0, "shared_bytes": 4,
        "barriers": 1}
    assert _find(parsed, "running_update_kernelIdE", "sm_75")["registers"] == 14
    assert _find(parsed, "patch_moments_kernelIdE", "sm_80") == {
        "registers": 80, "stack_bytes": 8, "spill_store_bytes": 16, "spill_load_bytes": 16, "shared_bytes": 16896,
        "barriers": 1}
    assert _find(parsed, "forward_kernelIfE", "sm_75") == {
        "registers": 4, "stack_bytes": 0, "spill_store_bytes": 0, "spill_load_bytes": 0, "shared_bytes": 0,
        "barriers": 0}
    assert _find(parsed, "sum_splits_kernel", "sm_75")["registers"] == 24


def test_parse_ptxas_keeps_callee_properties_off_the_entry():
    parsed = cr.parse_ptxas(CALLEE_PTXAS)
    assert set(parsed) == {("_Z12plain_kernelPf", "sm_80"), ("_Z14bounded_kernelPKfPfi", "sm_80")}
    assert parsed[("_Z14bounded_kernelPKfPfi", "sm_80")] == {
        "registers": 36, "stack_bytes": 64, "spill_store_bytes": 0, "spill_load_bytes": 0, "shared_bytes": 0,
        "barriers": 0}
    assert parsed[("_Z12plain_kernelPf", "sm_80")]["registers"] == 8


def test_parse_ptxas_rejects_an_entry_without_usage():
    truncated = "\n".join(REAL_PTXAS.splitlines()[:3])
    with pytest.raises(ValueError, match="Used N registers"):
        cr.parse_ptxas(truncated)


def test_parse_ptx_bounds_on_real_ptx():
    arch, bounds = cr.parse_ptx_bounds(REAL_PTX)
    assert arch == "sm_80"
    assert len(bounds) == 3
    by_part = {part: b for part in ("ns_forward_kernelIdE", "running_update_kernelIdE", "bounded_kernel")
               for mangled, b in bounds.items() if part in mangled}
    assert by_part["ns_forward_kernelIdE"] == {"max_threads": None, "min_blocks_per_sm": None}
    assert by_part["running_update_kernelIdE"] == {"max_threads": 256, "min_blocks_per_sm": None}
    assert by_part["bounded_kernel"] == {"max_threads": 128, "min_blocks_per_sm": 4}


@pytest.mark.parametrize("demangled, key", [
    # c++filt output of the real build's entry names
    ("void aecr::(anonymous namespace)::col2im_atomic_kernel<c10::Half, float>(aecr::DeformConvShape, long, "
     "c10::Half const*, c10::Half const*, c10::Half const*, float*)", "col2im_atomic_kernel<c10::Half, float>"),
    ("void aecr::(anonymous namespace)::im2col_kernel<float>(aecr::DeformConvShape, long, float const*, "
     "float const*, float const*, float*)", "im2col_kernel<float>"),
    ("aecr::(anonymous namespace)::sum_splits_kernel(float const*, long, long, float*)", "sum_splits_kernel"),
    ("void aecr::(anonymous namespace)::offset_mask_grad_kernel<float>(aecr::DeformConvShape, long, long, "
     "aecr::(anonymous namespace)::ChannelChunk const*, long, float const*, float const*, float*, float*)",
     "offset_mask_grad_kernel<float>"),
    ("void aecr::(anonymous namespace)::merge_moments_kernel<float>(long, long, long, double, "
     "at::OpMathType<float>::type const*, float*, float*)", "merge_moments_kernel<float>"),
    ("void aecr::(anonymous namespace)::forward_kernel<c10::BFloat16>(aecr::DeformConvShape, "
     "aecr::(anonymous namespace)::Geometry, c10::BFloat16 const*, aecr::(anonymous namespace)::SamplePlan const*, "
     "c10::BFloat16 const*, c10::BFloat16 const*, c10::BFloat16*)", "forward_kernel<c10::BFloat16>"),
    # c++filt output of the small file's entries (no namespace, no template)
    ("bounded_kernel(float const*, float*, int)", "bounded_kernel"),
    ("plain_kernel(float*)", "plain_kernel"),
])
def test_kernel_key(demangled, key):
    assert cr.kernel_key(demangled) == key


def test_declared_kernels_reads_names_through_launch_bounds(tmp_path):
    cuda = tmp_path / "csrc" / "cuda"
    cuda.mkdir(parents=True)
    # declarations as csrc/cuda writes them
    (cuda / "a.cu").write_text(
        "template <typename V>\n"
        "__global__ void im2col_kernel(DeformConvShape s, int64_t n, const V* input, const V* offset, const V* mask,\n"
        "                              V* columns) {}\n"
        "// __global__ void commented_out_kernel() {}\n"
        "/* a __global__ in a block comment */\n"
        "const char* text = \"__global__ void not_a_kernel()\";\n")
    (cuda / "b.cuh").write_text(
        "template <typename V>\n"
        "__global__ void __launch_bounds__(kBlockThreads) forward_kernel(DeformConvShape s, Geometry q, const V* in,\n"
        "                                                                V* output) {}\n"
        "__global__ void __launch_bounds__(kRunningUpdateThreads) running_update_kernel(\n"
        "    V* running_mean, bool* finite) {}\n"
        "__global__ void sum_splits_kernel(const float* partial, int64_t splits, int64_t size, float* out) {}\n"
        "extern \"C\" __global__ void __launch_bounds__(256, 2) c_kernel(int* x) {}\n")
    (cuda / "notes.txt").write_text("__global__ void ignored_kernel()\n")
    assert cr.declared_kernels(str(tmp_path)) == {
        "im2col_kernel": ["csrc/cuda/a.cu"], "forward_kernel": ["csrc/cuda/b.cuh"],
        "running_update_kernel": ["csrc/cuda/b.cuh"], "sum_splits_kernel": ["csrc/cuda/b.cuh"],
        "c_kernel": ["csrc/cuda/b.cuh"]}


# ---- limits and merging -----------------------------------------------------------------------------------------

def _row(**numbers):
    row = {"registers": 32, "stack_bytes": 0, "spill_store_bytes": 0, "spill_load_bytes": 0, "shared_bytes": 0,
           "barriers": 0, "max_threads": 256, "min_blocks_per_sm": None}
    row.update(numbers)
    return row


def test_block_registers_follows_the_allocation_rule():
    assert cr.block_registers(32, 256) == 8192
    assert cr.block_registers(33, 32) == 1280  # 33 * 32 = 1056 registers, rounded up to 5 units of 256
    assert cr.block_registers(255, 256) == 65536
    assert cr.block_registers(64, 1024) == 65536
    assert cr.block_registers(65, 1024) > 65536
    assert cr.block_registers(128, 33) == 8192  # 2 warps


def test_limit_problems_name_each_broken_rule():
    table = {"archs": ["sm_80", "sm_90"], "kernels": {
        "fine_kernel<float>": {"sources": ["csrc/cuda/a.cu"], "sm_80": _row(), "sm_90": _row()},
        "spilling_kernel": {"sources": ["csrc/cuda/a.cu"], "sm_80": _row(spill_store_bytes=8, spill_load_bytes=8),
                            "sm_90": _row()},
        "unbounded_kernel": {"sources": ["csrc/cuda/a.cu"], "sm_80": _row(max_threads=None),
                             "sm_90": _row(max_threads=None)},
        "heavy_kernel": {"sources": ["csrc/cuda/a.cu"], "sm_80": _row(registers=72, max_threads=1024),
                         "sm_90": _row(shared_bytes=48 * 1024 + 16)},
        "sm80_only_kernel": {"sources": ["csrc/cuda/a.cu"], "sm_80": _row()},
    }}
    problems = cr.limit_problems(table)
    assert len(problems) == 5, problems
    assert any(p.startswith("spills: spilling_kernel on sm_80: spills 8 bytes stores, 8 bytes loads") for p in problems)
    assert any(p.startswith("launch bound: unbounded_kernel: no __launch_bounds__ (on sm_80, sm_90") for p in problems)
    assert any(p.startswith("registers: heavy_kernel on sm_80: 72 registers x 1024 threads") for p in problems)
    assert any(p.startswith("shared memory: heavy_kernel on sm_90: 49168 bytes static shared memory") for p in problems)
    assert any(p.startswith("missing arch: sm80_only_kernel: not compiled for sm_90") for p in problems)


def test_merge_units_merges_a_shared_instantiation_and_flags_a_name_clash():
    same = "void aecr::(anonymous namespace)::scatter_entries_kernel<float>(aecr::DeformConvShape, long)"
    clash_a = "void aecr::(anonymous namespace)::gather_input_grad_kernel<float>(aecr::DeformConvShape, long)"
    clash_b = "void aecr::(anonymous namespace)::gather_input_grad_kernel<float>(aecr::PatchShape, long)"
    names = {"s1": same, "s2": same, "g1": clash_a, "g2": clash_b}

    def usage(registers):  # what parse_ptxas gives: the numbers without the PTX launch bound
        row = _row(registers=registers)
        del row["max_threads"], row["min_blocks_per_sm"]
        return row

    bound = {"max_threads": 256, "min_blocks_per_sm": None}
    units = [
        ("csrc/cuda/a.cu", {("s1", "sm_80"): usage(40), ("g1", "sm_80"): usage(30)},
         {("s1", "sm_80"): bound, ("g1", "sm_80"): bound}, names),
        ("csrc/cuda/b.cu", {("s2", "sm_80"): usage(40), ("g2", "sm_80"): usage(50)},
         {("s2", "sm_80"): bound, ("g2", "sm_80"): {"max_threads": None, "min_blocks_per_sm": None}}, names),
    ]
    kernels = cr.merge_units(units, ["sm_80"])
    assert kernels["scatter_entries_kernel<float>"] == {"sources": ["csrc/cuda/a.cu", "csrc/cuda/b.cu"],
                                                        "sm_80": _row(registers=40)}
    clash = kernels["gather_input_grad_kernel<float>"]
    assert clash["signatures"] == [clash_a, clash_b]
    assert clash["sm_80"]["registers"] == 50 and clash["sm_80"]["max_threads"] is None  # the worst of both
    assert set(clash["sm_80"]["by_source"]) == {"csrc/cuda/a.cu", "csrc/cuda/b.cu"}
    problems = cr.limit_problems({"archs": ["sm_80"], "kernels": kernels})
    assert any(p.startswith("name clash: gather_input_grad_kernel<float>: 2 different kernels") for p in problems)


def test_stale_problems_show_what_changed():
    old = {"archs": ["sm_80"], "sources_sha256": "a", "kernels": {
        "k<float>": {"sources": ["csrc/cuda/a.cu"], "sm_80": _row()},
        "gone_kernel": {"sources": ["csrc/cuda/a.cu"], "sm_80": _row()}}}
    new = {"archs": ["sm_80"], "sources_sha256": "b", "kernels": {
        "k<float>": {"sources": ["csrc/cuda/a.cu"], "sm_80": _row(registers=40)},
        "new_kernel": {"sources": ["csrc/cuda/a.cu"], "sm_80": _row()}}}
    assert cr.stale_problems(old, new) == [
        "sources_sha256: csrc/ changed since the table was generated",
        "+ new_kernel: compiled now, not in the committed table",
        "- gone_kernel: in the committed table, no longer compiled",
        "~ k<float> sm_80 registers: 32 -> 40"]
    assert cr.stale_problems(old, old) == []


def test_setup_constants_are_read_without_running_setup():
    constants = cr.setup_constants()
    assert isinstance(constants["DEFAULT_ARCH_LIST"], str)
    assert isinstance(constants["NVCC_FLAGS"], list)
    assert cr.parse_arch_list("7.5;8.0;9.0+PTX") == ["sm_75", "sm_80", "sm_90"]
    assert cr.parse_arch_list("8.6 9.0a") == ["sm_86", "sm_90a"]
