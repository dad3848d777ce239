"""Rates, ratios and the summary table, from the benchmarks a session timed.

Each benchmark's extra_info holds its work (``gflop``, ``megapixels``, ``images``: bench_work.py), the name of
its implementation (``impl``), its problem (``shape``) and the implementations it is compared with
(``baselines``). At the end of the session, before pytest-benchmark writes its JSON, ``annotate`` adds from the
median time

- the rates: ``gflop_per_s``, ``megapixels_per_s``, ``images_per_s``;
- for each baseline timed in the same group on the same shape: ``time_ratio[baseline]`` = this median / the
  baseline's and ``speedup[baseline]`` = its inverse (above 1: faster than the baseline).

Entries are plain dicts, ``{"name", "fullname", "group", "median_s", "rounds", "extra_info"}``: what
``entries_of`` makes of pytest-benchmark's results, and what the GPU check reads back.

    python benchmarks/bench_report.py RUN.json     # a saved run's groups as Markdown tables (for the README)
"""
import json
import sys

RATES = (("gflop", "gflop_per_s"), ("megapixels", "megapixels_per_s"), ("images", "images_per_s"))


def entries_of(benchmarks):
    """The timed benchmarks of a session (pytest-benchmark's Metadata objects) as entries; their extra_info is
    the benchmarks' own dict, so annotating an entry annotates the benchmark."""
    return [{"name": bench.name, "fullname": bench.fullname, "group": bench.group, "median_s": bench.stats.median,
             "rounds": len(bench.stats.data), "extra_info": bench.extra_info}
            for bench in benchmarks if bench.stats.data and not bench.has_error]


def annotate(entries):
    """Adds the rates and the ratios to the baselines to every entry's extra_info (idempotent)."""
    by_problem = {(e["group"], e["extra_info"].get("shape"), e["extra_info"].get("impl")): e for e in entries}
    for entry in entries:
        info, median = entry["extra_info"], entry["median_s"]
        for work, rate in RATES:
            if info.get(work) is not None and median > 0:
                info[rate] = info[work] / median
        ratios = {}
        for name in info.get("baselines", ()):
            baseline = by_problem.get((entry["group"], info.get("shape"), name))
            if baseline is not None and baseline["median_s"] > 0:
                ratios[name] = median / baseline["median_s"]
        info["time_ratio"] = ratios
        info["speedup"] = {name: 1 / ratio for name, ratio in ratios.items() if ratio > 0}
    return entries


def format_seconds(seconds):
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def describe_speedup(name, speedup):
    if speedup >= 1:
        return f"{speedup:.2f}x faster than {name}"
    return f"{1 / speedup:.2f}x slower than {name}"


def groups_of(entries):
    """{group: [entries]} in the order the groups first ran."""
    groups = {}
    for entry in entries:
        groups.setdefault(entry["group"], []).append(entry)
    return groups


def summary_lines(entries):
    """The session's summary: per group, each implementation's median, work, rates and ratios to its baselines."""
    lines = []
    for group, members in groups_of(entries).items():
        shapes = {e["extra_info"].get("shape") for e in members}
        lines.append(group)
        for entry in members:
            info = entry["extra_info"]
            label = info.get("impl", entry["name"])
            if len(shapes) > 1:
                label = f"{label} {info.get('shape')}"
            rates = (f"{info.get('gflop', 0):9.4g} GFLOP {info.get('gflop_per_s', 0):8.4g} GFLOP/s "
                     f"{info.get('megapixels_per_s', 0):8.4g} Mpx/s {info.get('images_per_s', 0):8.4g} img/s")
            against = ", ".join(describe_speedup(name, s) for name, s in info.get("speedup", {}).items())
            note = f" ({info['note']})" if info.get("note") else ""
            lines.append(f"  {label:<34} {format_seconds(entry['median_s']):>10}  {rates}"
                         f"{'  ' + against if against else ''}{note}")
    return lines


def entries_of_json(document):
    """The entries of a saved run (pytest-benchmark's JSON, as --benchmark-json writes it)."""
    return [{"name": b["name"], "fullname": b["fullname"], "group": b["group"], "median_s": b["stats"]["median"],
             "rounds": b["stats"]["rounds"], "extra_info": b["extra_info"]} for b in document["benchmarks"]]


def markdown_tables(entries):
    """One Markdown table per group: median, work, rates and speed-ups, as the README quotes them."""
    lines = []
    for group, members in groups_of(entries).items():
        several = len({e["extra_info"].get("shape") for e in members}) > 1
        lines += [f"**{group}**", "", "| implementation |" + (" shape |" if several else "") +
                  " median | GFLOP | GFLOP/s | Mpx/s | images/s | against the baselines |",
                  "|---|" + ("---|" if several else "") + "---|---|---|---|---|---|"]
        for entry in members:
            info = entry["extra_info"]
            against = ", ".join(describe_speedup(name, x) for name, x in info.get("speedup", {}).items())
            shape = f" {info.get('shape')} |" if several else ""
            lines.append(f"| {info.get('impl')} |{shape} {format_seconds(entry['median_s'])} | "
                         f"{info.get('gflop', 0):.4g} | {info.get('gflop_per_s', 0):.4g} | "
                         f"{info.get('megapixels_per_s', 0):.4g} | {info.get('images_per_s', 0):.4g} | "
                         f"{against or '-'} |")
        lines.append("")
    return lines


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print("\n".join(markdown_tables(entries_of_json(json.load(f)))))
