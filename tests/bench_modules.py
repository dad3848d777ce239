"""The benchmarks/ scripts as modules, for the tests of the benchmark suite and the GPU check."""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)  # the scripts import one another by name


def load(name: str):
    """benchmarks/<name>.py as a module of its own (not benchmarks' conftest-visible copy)."""
    spec = importlib.util.spec_from_file_location(f"_bench_test_{name}", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
