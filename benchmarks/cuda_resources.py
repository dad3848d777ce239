"""Resource usage of every CUDA kernel of the real build: registers, spills, stack, static shared memory, launch bound.

    python benchmarks/cuda_resources.py            regenerate benchmarks/cuda_resources.json and .md
    python benchmarks/cuda_resources.py --check    regenerate into a temporary folder; exit 1 if the committed
                                                   table is stale or a kernel breaks a limit (one line a problem)

Each csrc/cuda/*.cu translation unit is compiled for its device code only (`nvcc -fatbin`, no host object) for
every architecture of setup.py's DEFAULT_ARCH_LIST, with the flags of the real build (setup.py's NVCC_FLAGS,
torch's COMMON_NVCC_FLAGS and C++ standard, -fPIC, setup.py's include folders) plus `-Xptxas -v`, whose report
gives each entry function's registers, stack frame, spills, static shared memory and barriers, and `--keep`,
whose PTX gives each kernel's `.maxntid` (its __launch_bounds__). Kernels are keyed by their demangled name
without namespace, return type or parameters (`col2im_atomic_kernel<c10::Half, float>`), the name the CPU
emulator of tests/cuda_emulation looks them up by.

setup.py is read with `ast`, never imported (it builds when imported). The functions below that parse and check
need neither nvcc nor torch: tests/test_cuda_resources.py imports this file by path and uses them on the
committed table.
"""
import argparse
import ast
import concurrent.futures
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JSON_NAME = "cuda_resources.json"
MD_NAME = "cuda_resources.md"
REGENERATE = "python benchmarks/cuda_resources.py"
CHECK = "python benchmarks/cuda_resources.py --check"

# Limits of one block on every architecture from sm_75 on.
REGISTERS_PER_BLOCK = 65536
MAX_REGISTERS_PER_THREAD = 255
MAX_THREADS_PER_BLOCK = 1024
MAX_STATIC_SHARED_BYTES = 48 * 1024
WARP_SIZE = 32
REGISTER_ALLOCATION_UNIT = 256  # registers are allocated per warp, in units of 256

# The per-architecture numbers of a kernel; check (a) compares exactly these.
FIELDS = ("registers", "stack_bytes", "spill_store_bytes", "spill_load_bytes", "shared_bytes", "barriers",
          "max_threads", "min_blocks_per_sm")
KERNEL_SOURCE_EXTENSIONS = (".cu", ".cuh", ".h", ".hpp", ".inl")


# ---- setup.py, read without running it -------------------------------------------------------------------------

def setup_constants(setup_path=None):
    """The module-level constants of setup.py that are plain literals (name -> value), read with `ast`."""
    setup_path = setup_path or os.path.join(ROOT, "setup.py")
    with open(setup_path) as f:
        tree = ast.parse(f.read(), setup_path)
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Name):
                try:
                    constants[target.id] = ast.literal_eval(value)
                except ValueError:
                    pass  # not a literal (ROOT = os.path...)
    return constants


def setup_value(name, kind, setup_path=None):
    constants = setup_constants(setup_path)
    if name not in constants:
        raise SystemExit(f"setup.py has no module-level literal {name} (cuda_resources.py reads it with ast)")
    value = constants[name]
    if kind is list and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise SystemExit(f"setup.py's {name} must be a list of strings, not {value!r}")
    if kind is str and not isinstance(value, str):
        raise SystemExit(f"setup.py's {name} must be a string, not {value!r}")
    return value


def parse_arch_list(arch_list):
    """TORCH_CUDA_ARCH_LIST syntax ("7.5;8.0;9.0+PTX", also spaces, 9.0a) -> ["sm_75", "sm_80", "sm_90"]."""
    archs = []
    for item in re.split(r"[;\s]+", arch_list.strip()):
        if not item:
            continue
        match = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", item)
        if not match:
            raise SystemExit(f"cannot read architecture {item!r} of DEFAULT_ARCH_LIST={arch_list!r} "
                             f"(expected numbers like 8.0 or 9.0+PTX)")
        arch = f"sm_{match.group(1)}{match.group(2)}{match.group(3)}"
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise SystemExit(f"DEFAULT_ARCH_LIST={arch_list!r} names no architecture")
    return archs


def default_archs(setup_path=None):
    return parse_arch_list(setup_value("DEFAULT_ARCH_LIST", str, setup_path))


# ---- the sources ----------------------------------------------------------------------------------------------

def sources_sha256(root=ROOT, entries=("csrc",)):
    """sha256 over every file of `entries` (folders or files under root), in sorted order of path: path, NUL, byte
    count, NUL, content."""
    digest = hashlib.sha256()
    paths = []
    for entry in entries:
        full = os.path.join(root, entry)
        if os.path.isfile(full):
            paths.append(entry.replace(os.sep, "/"))
            continue
        for folder, dirs, files in os.walk(full):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            paths += [os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/") for name in files]
    for rel in sorted(paths):
        with open(os.path.join(root, rel), "rb") as f:
            content = f.read()
        digest.update(rel.encode() + b"\0" + str(len(content)).encode() + b"\0")
        digest.update(content)
    return digest.hexdigest()


_COMMENT_OR_LITERAL = re.compile(r"//[^\n]*|/\*.*?\*/|\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'", re.S)


def strip_comments(text):
    """C++ text with comments blanked (newlines kept) and string / character literals emptied."""
    def blank(match):
        token = match.group(0)
        if token.startswith("/"):
            return "\n" * token.count("\n") or " "
        return token[0] * 2
    return _COMMENT_OR_LITERAL.sub(blank, text)


def _skip_group(text, i, opening, closing):
    """Index just past the bracket group that opens at text[i]."""
    depth = 0
    while i < len(text):
        if text[i] == opening:
            depth += 1
        elif text[i] == closing:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return i


_IDENTIFIER = re.compile(r"[A-Za-z_]\w*(?:\s*::\s*[A-Za-z_]\w*)*")


def kernel_name_after(text, pos):
    """The name of the kernel declared by the `__global__` that ends at text[pos], or None.

    Skips specifiers (void, static, extern, inline), `__launch_bounds__(...)` and other `__x__(...)` attributes,
    `[[...]]` attributes and `alignas(...)`; the name is the first other identifier followed by `(`.
    """
    i = pos
    for _ in range(64):
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return None
        if text.startswith("[[", i):
            i = _skip_group(text, i, "[", "]")
            continue
        if text[i] == '"':  # extern "C" (literals are emptied by strip_comments)
            i = text.index('"', i + 1) + 1
            continue
        match = _IDENTIFIER.match(text, i)
        if not match:
            return None
        name = re.sub(r"\s+", "", match.group(0))
        i = match.end()
        j = i
        while j < len(text) and text[j].isspace():
            j += 1
        if j < len(text) and text[j] == "(":
            last = name.split("::")[-1]
            if last.startswith("__") or last == "alignas":
                i = _skip_group(text, j, "(", ")")
                continue
            return last
        if j < len(text) and text[j] == "<":  # a templated return type
            i = _skip_group(text, j, "<", ">")
    return None


def declared_kernels(root=ROOT):
    """{kernel name: [files]} of every `__global__` function declared under csrc/cuda/."""
    kernels = {}
    base = os.path.join(root, "csrc", "cuda")
    for path in sorted(glob.glob(os.path.join(base, "**", "*"), recursive=True)):
        if not path.endswith(KERNEL_SOURCE_EXTENSIONS) or not os.path.isfile(path):
            continue
        with open(path, errors="replace") as f:
            text = strip_comments(f.read())
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        for match in re.finditer(r"\b__global__\b", text):
            name = kernel_name_after(text, match.end())
            if name is None:
                line = text.count("\n", 0, match.start()) + 1
                raise ValueError(f"{rel}:{line}: cannot read the kernel name after __global__")
            files = kernels.setdefault(name, [])
            if rel not in files:
                files.append(rel)
    return kernels


# ---- ptxas and PTX ---------------------------------------------------------------------------------------------

def kernel_key(demangled):
    """`name<template args>` of a demangled kernel: no namespace, return type or parameter list.

    "void aecr::(anonymous namespace)::col2im_atomic_kernel<c10::Half, float>(aecr::DeformConvShape, ...)"
    -> "col2im_atomic_kernel<c10::Half, float>"; "aecr::sum_splits_kernel(float const*, ...)" -> "sum_splits_kernel".
    """
    s = demangled.strip()
    if s.endswith(")"):  # drop the parameter list: the parenthesised group that ends the name
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            if s[i] == ")":
                depth += 1
            elif s[i] == "(":
                depth -= 1
                if depth == 0:
                    s = s[:i].rstrip()
                    break
    start, depth, i = 0, 0, 0
    while i < len(s):
        c = s[i]
        if c in "<([{":
            depth += 1
        elif c in ">)]}":
            depth -= 1
        elif depth == 0 and s.startswith("::", i):
            start = i + 2
            i += 1
        elif depth == 0 and c == " ":
            start = i + 1
        i += 1
    return s[start:]


_ENTRY = re.compile(r"^ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPERTIES = re.compile(r"^ptxas info\s*: Function properties for (\S+)")
_FRAME = re.compile(r"^\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"^ptxas info\s*: Used (\d+) registers")


def parse_ptxas(text):
    """`-Xptxas -v` output -> {(mangled name, arch): {registers, stack_bytes, spill_*_bytes, shared_bytes,
    barriers}} for every entry function. Lines that are not ptxas's resource report are ignored."""
    found = {}
    entry = properties_of = None
    for line in text.splitlines():
        match = _ENTRY.match(line)
        if match:
            entry = (match.group(1), match.group(2))
            if entry in found:
                raise ValueError(f"ptxas reported {entry[0]} twice for {entry[1]}")
            found[entry] = {"registers": None, "stack_bytes": 0, "spill_store_bytes": 0, "spill_load_bytes": 0,
                            "shared_bytes": 0, "barriers": 0}
            properties_of = None
            continue
        match = _PROPERTIES.match(line)
        if match:
            properties_of = match.group(1)
            continue
        match = _FRAME.match(line)
        if match:
            if entry is not None and properties_of == entry[0]:
                found[entry].update(stack_bytes=int(match.group(1)), spill_store_bytes=int(match.group(2)),
                                    spill_load_bytes=int(match.group(3)))
            properties_of = None
            continue
        match = _USED.match(line)
        if match and entry is not None:
            usage = found[entry]
            usage["registers"] = int(match.group(1))
            barriers = re.search(r"used (\d+) barriers", line)
            smem = re.search(r"(\d+) bytes smem", line)
            usage["barriers"] = int(barriers.group(1)) if barriers else 0
            usage["shared_bytes"] = int(smem.group(1)) if smem else 0
            entry = None
    missing = [f"{name} ({arch})" for (name, arch), usage in found.items() if usage["registers"] is None]
    if missing:
        raise ValueError("ptxas gave no 'Used N registers' line for " + ", ".join(missing))
    return found


_PTX_TARGET = re.compile(r"^\s*\.target\s+(sm_\w+)", re.M)
_PTX_ENTRY = re.compile(r"^[ \t]*(?:\.\w+[ \t]+)*\.entry[ \t]+([\w$.]+)[ \t]*\(", re.M)


def _ptx_dims(directive, header):
    match = re.search(r"\." + directive + r"\s+(\d+)(?:\s*,\s*(\d+))?(?:\s*,\s*(\d+))?", header)
    return math.prod(int(g) for g in match.groups() if g is not None) if match else None


def parse_ptx_bounds(text):
    """PTX -> (arch, {mangled entry: {"max_threads": .maxntid product or .reqntid product or None,
    "min_blocks_per_sm": .minnctapersm or None}})."""
    target = _PTX_TARGET.search(text)
    if not target:
        raise ValueError("PTX without a .target directive")
    bounds = {}
    for match in _PTX_ENTRY.finditer(text):
        body = text.find("\n{", match.end())
        header = text[match.end():body if body >= 0 else len(text)]
        max_threads = _ptx_dims("maxntid", header)
        if max_threads is None:
            max_threads = _ptx_dims("reqntid", header)
        bounds[match.group(1)] = {"max_threads": max_threads, "min_blocks_per_sm": _ptx_dims("minnctapersm", header)}
    return target.group(1), bounds


def demangle(names, cxxfilt="c++filt"):
    """{mangled: demangled} through binutils c++filt (one call)."""
    names = sorted(set(names))
    if not names:
        return {}
    if shutil.which(cxxfilt) is None:
        raise SystemExit(f"{cxxfilt} not found: install binutils (c++filt demangles the kernel names)")
    out = subprocess.run([cxxfilt], input="\n".join(names) + "\n", capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    if len(lines) != len(names):
        raise SystemExit(f"c++filt returned {len(lines)} lines for {len(names)} names")
    return dict(zip(names, lines))


# ---- the table -------------------------------------------------------------------------------------------------

def _worst(values):
    """Largest of the numbers; None (no launch bound: unbounded) is the worst of all."""
    return None if any(v is None for v in values) else max(values)


def merge_units(units, archs):
    """Table of kernels from compiled units: [(source, {(mangled, arch): usage}, {(mangled, arch): bounds},
    {mangled: demangled})]. An instantiation compiled by several units (a header included twice) is merged:
    the numbers must agree; where they do not, the table keeps the largest and lists each unit's under
    "by_source". Different kernels under one key (same name and template arguments, other parameters) are
    listed under "signatures" (check reports them)."""
    per_key = {}
    for source, usage, bounds, names in units:
        for (mangled, arch), numbers in usage.items():
            key = kernel_key(names[mangled])
            row = dict(numbers)
            row.update(bounds.get((mangled, arch), {"max_threads": None, "min_blocks_per_sm": None}))
            entry = per_key.setdefault(key, {"sources": set(), "signatures": set(), "archs": {}})
            entry["sources"].add(source)
            entry["signatures"].add(names[mangled])
            entry["archs"].setdefault(arch, {}).setdefault(source, []).append(row)
    kernels = {}
    for key in sorted(per_key):
        entry = per_key[key]
        kernel = {"sources": sorted(entry["sources"])}
        if len(entry["signatures"]) > 1:
            kernel["signatures"] = sorted(entry["signatures"])
        for arch in archs:
            by_source = entry["archs"].get(arch)
            if not by_source:
                continue
            rows = [row for source_rows in by_source.values() for row in source_rows]
            merged = {}
            for field in FIELDS:
                values = [row[field] for row in rows]
                if field == "max_threads":
                    merged[field] = _worst(values)
                else:
                    merged[field] = max((v for v in values if v is not None), default=None)
            if any(row != rows[0] for row in rows):
                merged["by_source"] = {source: source_rows if len(source_rows) > 1 else source_rows[0]
                                       for source, source_rows in sorted(by_source.items())}
            kernel[arch] = merged
        kernels[key] = kernel
    return kernels


def block_registers(registers, threads):
    """Registers a block of `threads` threads takes: per warp ceil(registers * 32 / 256) * 256."""
    per_warp = math.ceil(registers * WARP_SIZE / REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    return per_warp * math.ceil(threads / WARP_SIZE)


def limit_problems(table, archs=None):
    """One line per broken rule: spills, no launch bound, registers per block / thread, static shared memory,
    two kernels under one key, a kernel missing on an architecture."""
    archs = archs or table["archs"]
    problems = []
    for key, kernel in table["kernels"].items():
        where = ", ".join(kernel["sources"])
        if len(kernel.get("signatures", [])) > 1:
            problems.append(f"name clash: {key}: {len(kernel['signatures'])} different kernels share this name and template "
                            f"arguments ({where}): rename one (the table and the CPU emulator key kernels by it): "
                            + " | ".join(kernel["signatures"]))
        missing = [arch for arch in archs if arch not in kernel]
        if missing:
            problems.append(f"missing arch: {key}: not compiled for {', '.join(missing)} ({where})")
        unbounded = [arch for arch in archs if arch in kernel and kernel[arch]["max_threads"] is None]
        if unbounded:
            problems.append(f"launch bound: {key}: no __launch_bounds__ (on {', '.join(unbounded)}; {where}): every kernel "
                            f"must declare the largest block it is launched with")
        for arch in archs:
            if arch not in kernel:
                continue
            r = kernel[arch]
            if r["spill_store_bytes"] or r["spill_load_bytes"]:
                problems.append(f"spills: {key} on {arch}: spills {r['spill_store_bytes']} bytes stores, "
                                f"{r['spill_load_bytes']} bytes loads ({r['registers']} registers, "
                                f"{r['stack_bytes']} bytes stack; {where})")
            if r["registers"] > MAX_REGISTERS_PER_THREAD:
                problems.append(f"registers: {key} on {arch}: {r['registers']} registers per thread > "
                                f"{MAX_REGISTERS_PER_THREAD} ({where})")
            threads = r["max_threads"]
            if threads is not None and threads > MAX_THREADS_PER_BLOCK:
                problems.append(f"launch bound: {key} on {arch}: launch bound {threads} threads > {MAX_THREADS_PER_BLOCK} "
                                f"({where})")
            if threads is not None and block_registers(r["registers"], threads) > REGISTERS_PER_BLOCK:
                problems.append(f"registers: {key} on {arch}: {r['registers']} registers x {threads} threads takes "
                                f"{block_registers(r['registers'], threads)} registers per block > "
                                f"{REGISTERS_PER_BLOCK} ({where})")
            if r["shared_bytes"] > MAX_STATIC_SHARED_BYTES:
                problems.append(f"shared memory: {key} on {arch}: {r['shared_bytes']} bytes static shared memory > "
                                f"{MAX_STATIC_SHARED_BYTES} ({where})")
    return problems


def problem_summary(problems):
    """"launch bound 34, spills 2, ...": how many problems of each kind (the word before a problem's first colon)."""
    counts = {}
    for problem in problems:
        kind = problem.split(":", 1)[0]
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{kind} {n}" for kind, n in counts.items())


def coverage_problems(table, root=ROOT, archs=None):
    """Kernels declared under csrc/cuda/ but not in the table (on every arch), and table kernels no source
    declares."""
    archs = archs or table["archs"]
    declared = declared_kernels(root)
    by_name = {}
    for key in table["kernels"]:
        by_name.setdefault(key.split("<", 1)[0], []).append(key)
    problems = []
    for name, files in sorted(declared.items()):
        keys = by_name.get(name, [])
        if not keys:
            problems.append(f"coverage: {name} ({', '.join(files)}): declared __global__ but not in the table (never "
                            f"instantiated, or the table is stale: regenerate with `{REGENERATE}`)")
            continue
        for arch in archs:
            if not any(arch in table["kernels"][key] for key in keys):
                problems.append(f"coverage: {name} ({', '.join(files)}): not in the table for {arch}")
    for name, keys in sorted(by_name.items()):
        if name not in declared:
            problems.append(f"coverage: {', '.join(keys)}: in the table but no __global__ {name} under csrc/cuda/ "
                            f"(regenerate with `{REGENERATE}`)")
    return problems


def stale_problems(committed, fresh):
    """What differs between the committed table and a fresh one: archs, sources hash, kernel set, numbers."""
    problems = []
    if committed.get("archs") != fresh["archs"]:
        problems.append(f"archs: committed {committed.get('archs')}, now {fresh['archs']}")
    if committed.get("sources_sha256") != fresh["sources_sha256"]:
        problems.append("sources_sha256: csrc/ changed since the table was generated")
    old, new = committed.get("kernels", {}), fresh["kernels"]
    for key in sorted(set(new) - set(old)):
        problems.append(f"+ {key}: compiled now, not in the committed table")
    for key in sorted(set(old) - set(new)):
        problems.append(f"- {key}: in the committed table, no longer compiled")
    for key in sorted(set(old) & set(new)):
        if old[key].get("sources") != new[key]["sources"]:
            problems.append(f"~ {key} sources: {old[key].get('sources')} -> {new[key]['sources']}")
        for arch in fresh["archs"]:
            before, after = old[key].get(arch), new[key].get(arch)
            if before is None or after is None:
                if before != after:
                    problems.append(f"~ {key} {arch}: {'missing' if before is None else 'present'} in the committed "
                                    f"table, {'missing' if after is None else 'present'} now")
                continue
            for field in FIELDS:
                if before.get(field) != after.get(field):
                    problems.append(f"~ {key} {arch} {field}: {before.get(field)} -> {after.get(field)}")
    return problems


# ---- output ----------------------------------------------------------------------------------------------------

def _dump(value, indent=0):
    """JSON with one line per kernel-and-arch record (objects and lists of scalars stay on one line)."""
    def scalar_or_list(v):
        return not isinstance(v, (dict, list)) or (isinstance(v, list) and not any(isinstance(x, (dict, list))
                                                                                   for x in v))

    if scalar_or_list(value) or (isinstance(value, dict) and all(scalar_or_list(v) for v in value.values())):
        return json.dumps(value)
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(value, list):
        return "[\n" + ",\n".join(inner + _dump(v, indent + 2) for v in value) + "\n" + pad + "]"
    return ("{\n" + ",\n".join(f"{inner}{json.dumps(k)}: {_dump(v, indent + 2)}" for k, v in value.items())
            + "\n" + pad + "}")


def render_json(table):
    return _dump(table) + "\n"


def _bound(value):
    return "none" if value is None else str(value)


def render_markdown(table):
    archs = table["archs"]
    lines = [
        "# CUDA kernel resources",
        "",
        f"Generated by `{table['generated_by']}` (check: `{CHECK}`) from csrc/ at sha256 "
        f"`{table['sources_sha256'][:16]}`; nvcc {table['nvcc']}, torch {table['torch']}. Do not edit: regenerate.",
        "",
        "Per architecture: registers per thread, spill stores / loads (bytes), stack frame (bytes), static shared "
        "memory (bytes). Launch bound: the `__launch_bounds__` maximum threads per block (`.maxntid`), "
        "`none` when the kernel declares none. Sources: the translation units that compile the kernel.",
        "",
        "Device code was compiled as:",
        "",
        "```",
        "nvcc -fatbin " + " ".join(table["flags"]) + " --keep --keep-dir <tmp> -o <tmp>/<unit>.fatbin <unit>.cu",
        "```",
        "",
    ]
    header = ["kernel", "launch bound"]
    for arch in archs:
        header += [f"{arch} regs", f"{arch} spill st/ld", f"{arch} stack", f"{arch} smem"]
    header.append("sources")
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["--:"] * (len(header) - 2) + ["---"]) + "|"]
    for key, kernel in table["kernels"].items():
        bounds = {arch: kernel[arch]["max_threads"] for arch in archs if arch in kernel}
        if len(set(bounds.values())) == 1:
            bound = _bound(next(iter(bounds.values())))
        else:
            bound = ", ".join(f"{arch}: {_bound(v)}" for arch, v in bounds.items())
        row = [f"`{key}`", bound]
        for arch in archs:
            r = kernel.get(arch)
            if r is None:
                row += ["-"] * 4
                continue
            row += [str(r["registers"]), f"{r['spill_store_bytes']} / {r['spill_load_bytes']}", str(r["stack_bytes"]),
                    str(r["shared_bytes"])]
        row.append(", ".join(s.rsplit("/", 1)[-1] for s in kernel["sources"]))
        lines.append("| " + " | ".join(row) + " |")
    problems = limit_problems(table)
    lines += ["", "## Problems", ""]
    if problems:
        lines += [f"`{CHECK}` fails on these (limits: no spills, a launch bound on every kernel, at most "
                  f"{MAX_REGISTERS_PER_THREAD} registers per thread and {REGISTERS_PER_BLOCK} per block at the "
                  f"launch bound, at most {MAX_STATIC_SHARED_BYTES} bytes static shared memory):", ""]
        lines += [f"By kind: {problem_summary(problems)}.", "", "```text"] + problems + ["```"]
    else:
        lines.append("None: no spills, every kernel has a launch bound, and every block fits the register and "
                     "shared-memory limits.")
    return "\n".join(lines) + "\n"


def write_outputs(table, folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, JSON_NAME), "w") as f:
        f.write(render_json(table))
    with open(os.path.join(folder, MD_NAME), "w") as f:
        f.write(render_markdown(table))


def load_table(folder=None):
    with open(os.path.join(folder or os.path.join(ROOT, "benchmarks"), JSON_NAME)) as f:
        return json.load(f)


# ---- compiling -------------------------------------------------------------------------------------------------

def find_nvcc():
    """The nvcc the build would use: $CUDA_HOME (or $CUDA_PATH)/bin/nvcc, else nvcc on the PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.path.join(os.environ[var], "bin", "nvcc")
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.path.isfile(nvcc):
        raise SystemExit("nvcc not found: put it on the PATH or set CUDA_HOME")
    return nvcc


def nvcc_toolkit(nvcc):
    """The toolkit folder nvcc really runs from (through wrapper scripts), as nvcc --dryrun reports it."""
    out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True,
                         text=True)
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    if not match:
        raise SystemExit(f"{nvcc} --dryrun did not say where its toolkit is:\n{out.stdout}{out.stderr}")
    return os.path.realpath(match.group(1).strip())


def nvcc_release(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release [^\n]+", out)
    return match.group(0).strip() if match else out.strip().splitlines()[-1]


def torch_std_flag(cpp_extension, nvcc_flags):
    """The -std flag torch's BuildExtension gives nvcc: none when the extension's nvcc flags already have one,
    else the `-std=` + standard that its build_extensions appends (read from torch's own source, so a torch
    that moves to another standard is followed)."""
    if any(flag.startswith("-std=") for flag in list(cpp_extension.COMMON_NVCC_FLAGS) + list(nvcc_flags)):
        return None
    import inspect
    source = inspect.getsource(cpp_extension.BuildExtension.build_extensions)
    standards = set(re.findall(r"['\"](c\+\+\d\w*)['\"]", source))
    if len(standards) != 1:
        raise SystemExit(f"cannot tell which C++ standard torch's BuildExtension gives nvcc (found {standards} in "
                         f"{cpp_extension.__file__}): update torch_std_flag in {__file__}")
    return "-std=" + standards.pop()


class Setup:
    """The compile command of the device code, as the real build runs nvcc."""

    def __init__(self, root=ROOT):
        self.root = root
        self.archs = default_archs(os.path.join(root, "setup.py"))
        nvcc_flags = setup_value("NVCC_FLAGS", list, os.path.join(root, "setup.py"))
        self.nvcc = find_nvcc()
        toolkit = nvcc_toolkit(self.nvcc)
        os.environ.setdefault("CUDA_HOME", toolkit)  # read when torch.utils.cpp_extension is imported
        # Without a GPU, importing cpp_extension warns that no CUDA runtime is found: expected here.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        import torch
        from torch.utils import cpp_extension
        self.torch_version = torch.__version__
        self.nvcc_version = nvcc_release(self.nvcc)
        std = torch_std_flag(cpp_extension, nvcc_flags)
        # As setup.py: csrc, csrc/include, the pip CUDA packages' include folders, then CUDAExtension's.
        torch_dir = os.path.dirname(torch.__file__)
        pip_cuda = sorted(os.path.abspath(p) for p in glob.glob(os.path.join(torch_dir, "..", "nvidia", "cu*",
                                                                              "include")))
        includes = [os.path.join(root, "csrc"), os.path.join(root, "csrc", "include")] + pip_cuda
        includes += cpp_extension.include_paths("cuda")
        gencode = []
        for arch in self.archs:
            gencode += ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]
        # Order of torch's unix_cuda_flags: COMMON_NVCC_FLAGS, -fPIC, the extension's flags, archs, -std.
        self.flags = (list(cpp_extension.COMMON_NVCC_FLAGS) + ["-Xcompiler", "-fPIC"] + list(nvcc_flags) + gencode
                      + ([std] if std else []))
        if os.environ.get("CC") and not any(f.startswith(("-ccbin", "--compiler-bindir")) for f in self.flags):
            self.flags += ["-ccbin", os.environ["CC"]]  # as torch does
        self.flags += [f"-I{path}" for path in includes] + ["-Xptxas", "-v"]
        site = os.path.dirname(torch_dir)
        self.places = [(torch_dir, "$TORCH"), (site, "$SITE_PACKAGES"), (toolkit, "$CUDA_HOME"),
                       (root + os.sep, "")]

    def shown(self, flag):
        """A flag with the machine's folders named ($TORCH, $SITE_PACKAGES, $CUDA_HOME, repository-relative)."""
        for folder, name in self.places:
            if folder in flag:
                flag = flag.replace(folder, name)
        return flag

    def compile(self, source, workdir, log_dir=None):
        """(usage, bounds, seconds, log) of one translation unit (repository-relative path)."""
        stem = os.path.splitext(os.path.basename(source))[0]
        keep = os.path.join(workdir, stem)
        os.makedirs(keep)
        command = ([self.nvcc, "-fatbin", "-o", os.path.join(keep, stem + ".fatbin")] + self.flags
                   + ["--keep", "--keep-dir", keep, source])
        start = time.time()
        result = subprocess.run(command, cwd=self.root, capture_output=True, text=True)
        seconds = time.time() - start
        log = result.stdout + result.stderr
        if log_dir:
            with open(os.path.join(log_dir, stem + ".nvcc.log"), "w") as f:
                f.write(" ".join(command) + "\n" + log)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source} (exit {result.returncode}):\n{' '.join(command)}\n"
                               f"{log[-6000:]}")
        usage = parse_ptxas(log)
        bounds = {}
        for ptx in glob.glob(os.path.join(keep, "*.ptx")):
            with open(ptx) as f:
                arch, entries = parse_ptx_bounds(f.read())
            bounds.update({(mangled, arch): b for mangled, b in entries.items()})
        absent = sorted(f"{m} ({a})" for (m, a) in usage if (m, a) not in bounds)
        if absent:
            raise RuntimeError(f"{source}: no kept PTX entry for " + ", ".join(absent[:5]))
        return usage, bounds, seconds, log


def generate(jobs=2, root=ROOT, log=print, log_dir=None):
    """Compiles every csrc/cuda/*.cu and returns the table."""
    setup = Setup(root)
    sources = sorted(os.path.relpath(p, root).replace(os.sep, "/")
                     for p in glob.glob(os.path.join(root, "csrc", "cuda", "*.cu")))
    if not sources:
        raise SystemExit("no csrc/cuda/*.cu to compile")
    log(f"compiling {len(sources)} units for {', '.join(setup.archs)} with {setup.nvcc_version}, {jobs} jobs")
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="cuda_resources_") as workdir, \
            concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
        futures = {source: pool.submit(setup.compile, source, workdir, log_dir) for source in sources}
        compiled = {}
        for source in sources:
            try:
                compiled[source] = futures[source].result()
            except RuntimeError as error:
                for future in futures.values():
                    future.cancel()
                raise SystemExit(f"cuda_resources: {error}")
            log(f"  {source}: {len({m for m, _ in compiled[source][0]})} kernels in {compiled[source][2]:.0f} s")
    names = demangle({mangled for usage, _, _, _ in compiled.values() for mangled, _ in usage})
    units = [(source, usage, bounds, names) for source, (usage, bounds, _, _) in compiled.items()]
    log(f"compiled in {time.time() - start:.0f} s")
    return {
        "generated_by": REGENERATE,
        "nvcc": setup.nvcc_version,
        "torch": setup.torch_version,
        "archs": setup.archs,
        "flags": [setup.shown(flag) for flag in setup.flags],
        "sources_sha256": sources_sha256(root),
        "kernels": merge_units(units, setup.archs),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="regenerate into a temporary folder; exit 1 if the committed table is stale or a "
                             "kernel breaks a limit")
    parser.add_argument("--jobs", type=int, default=2, help="translation units compiled at once (default 2)")
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks"),
                        help="where a plain run writes cuda_resources.json and .md (default benchmarks/)")
    parser.add_argument("--log-dir", help="also write each unit's nvcc command and output (ptxas report) there")
    args = parser.parse_args(argv)
    start = time.time()
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    table = generate(args.jobs, log=log, log_dir=args.log_dir)
    if not args.check:
        write_outputs(table, args.out_dir)
        problems = limit_problems(table) + coverage_problems(table)
        print(f"wrote {os.path.join(args.out_dir, JSON_NAME)} and {MD_NAME}: {len(table['kernels'])} kernels, "
              f"{len(problems)} problems (`{CHECK}` lists them), {time.time() - start:.0f} s")
        return 0
    with tempfile.TemporaryDirectory(prefix="cuda_resources_check_") as folder:
        write_outputs(table, folder)
        fresh = load_table(folder)
    committed_path = os.path.join(ROOT, "benchmarks", JSON_NAME)
    stale = []
    if not os.path.isfile(committed_path):
        stale.append(f"{os.path.relpath(committed_path, ROOT)} is missing")
    else:
        committed = load_table()
        stale = stale_problems(committed, fresh)
        for field in ("nvcc", "torch"):
            if committed.get(field) != fresh[field]:
                print(f"note: committed table made with {field} {committed.get(field)}, this one with {fresh[field]}")
    problems = ([f"stale: {p}" for p in stale] + limit_problems(fresh)
                + coverage_problems(fresh))
    for problem in problems:
        print(problem)
    if problems:
        print("problems by kind: " + problem_summary(problems))
    if stale:
        print(f"the committed benchmarks/{JSON_NAME} differs from the sources: regenerate it with `{REGENERATE}` "
              f"and commit benchmarks/{JSON_NAME} and benchmarks/{MD_NAME}")
    verdict = f"{len(problems)} problems" if problems else "ok"
    print(f"cuda_resources --check: {len(fresh['kernels'])} kernels on {', '.join(fresh['archs'])}: {verdict} "
          f"({time.time() - start:.0f} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
