"""A quick run of benchmarks/bench_memory.py on a tiny image: each case in its own process, the table, the JSON."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_memory.py")


def test_bench_memory_tiny_run_writes_table_and_json(tmp_path):
    target = tmp_path / "memory.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, SCRIPT, "--sizes", "32x48", "--cases", "dcn_aecr_ops", "model_tiled",
                           "--tile", "32", "--tile-overlap", "12", "--threads", "1", "--json", str(target)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "| case | size | time (s) | baseline RSS (MiB)" in done.stdout
    assert "| model_tiled (32/12) | 32x48 |" in done.stdout
    document = json.loads(target.read_text())
    assert document["complete"] and document["machine"]["torch"] and document["machine"]["cpu"]
    dcn, tiled = document["results"]
    for record in (dcn, tiled):
        assert "error" not in record, record
        assert 0 < record["baseline_rss_bytes"] <= record["peak_rss_bytes"]
        assert record["increment_bytes"] == record["peak_rss_bytes"] - record["baseline_rss_bytes"]
        assert record["seconds"] > 0
    h, w = 32 // 4, 48 // 4
    assert dcn["shapes"]["input"] == [1, 256, h, w] and dcn["shapes"]["offset"] == [1, 18, h, w]
    assert dcn["least_bytes"] == 4 * ((256 + 18 + 9 + 256) * h * w + 256 * 256 * 9 + 256)
    assert tiled["tile"] == 32 and tiled["least_bytes"] == 2 * 4 * 3 * 32 * 48 + tiled["weights_bytes"]


def test_bench_memory_refuses_a_bad_size_and_tile():
    for options, message in ((["--sizes", "huge"], "size must be one of"),
                             (["--tile", "64", "--tile-overlap", "32"], "--tile (64) must be larger than 2 *")):
        done = subprocess.run([sys.executable, SCRIPT, *options], capture_output=True, text=True, cwd=ROOT,
                              timeout=60)
        assert done.returncode == 2 and message in done.stderr
