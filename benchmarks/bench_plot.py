"""The scaling plot: median time against work (GFLOP), log-log, drawn with Pillow.

One panel per sweep (batch, channels, image size: the columns) and per device, precision and pass (forward,
forward+backward: the rows); in each, one line per implementation (onnxruntime in the CPU forward panels only),
and dashed beside it the line of slope 1 through its smallest problem: where an implementation's line bends away
from its dashed line, its cost has stopped growing linearly with the work (above: it grows faster, e.g. out of
cache; below: fixed overheads still dominate).
"""
import math

PANEL = (440, 330)
MARGIN = {"left": 64, "right": 14, "top": 30, "bottom": 42}
HEADER = 44
COLOURS = {"aecr": (31, 90, 180), "torchvision": (222, 110, 20), "conv2d": (40, 150, 60),
           "onnxruntime": (200, 30, 60)}
OTHER = (120, 60, 160)
GRID = (225, 225, 225)
# The pass of a sweep's entry that does not say: runs saved before the forward sweeps timed forward+backward only.
DEFAULT_PASS = "forward+backward"


def tick_label(seconds):
    """1 us, 20 ms, 5 s: the shortest label of a tick's time."""
    for scale, unit in ((1e-6, "us"), (1e-3, "ms"), (1, "s")):
        if seconds < 1000 * scale or unit == "s":
            return f"{round(seconds / scale, 6):g} {unit}"


def colour(impl):
    return next((c for prefix, c in COLOURS.items() if impl.startswith(prefix)), OTHER)


def sweep_panels(entries):
    """{(device, precision, pass, sweep): {"label": text, "lines": {impl: [(gflop, seconds), ...]}}} of the entries
    that belong to a sweep, in the order they ran."""
    panels = {}
    for entry in entries:
        info = entry["extra_info"]
        if not info.get("sweep") or not info.get("gflop") or entry["median_s"] <= 0:
            continue
        key = (info["device"], info["precision"], info.get("pass", DEFAULT_PASS), info["sweep"])
        panel = panels.setdefault(key, {"label": info.get("sweep_label", info["sweep"]), "lines": {}})
        panel["lines"].setdefault(info["impl"], []).append((info["gflop"], entry["median_s"]))
    return panels


def decade_ticks(lo, hi):
    """Tick values between 10**lo and 10**hi: the decades, and 2 and 5 times them when the range is short."""
    steps = (1, 2, 5) if hi - lo < 2.5 else (1,)
    ticks = []
    for exponent in range(math.floor(lo), math.ceil(hi) + 1):
        for step in steps:
            value = step * 10.0 ** exponent
            if lo <= math.log10(value) <= hi:
                ticks.append(value)
    return ticks


def padded_range(values):
    lo, hi = math.log10(min(values)), math.log10(max(values))
    pad = max(0.15, 0.08 * (hi - lo))
    return lo - pad, hi + pad


def dashed(draw, start, end, fill, dash=6):
    (x0, y0), (x1, y1) = start, end
    length = math.hypot(x1 - x0, y1 - y0)
    for i in range(int(length // dash) + 1):
        if i % 2 == 0:
            a, b = i * dash / length if length else 0, min(1.0, (i + 1) * dash / length) if length else 0
            draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
                      fill=fill, width=1)


def draw_panel(draw, origin, title, lines):
    ox, oy = origin
    width, height = PANEL
    left, top = ox + MARGIN["left"], oy + MARGIN["top"]
    right, bottom = ox + width - MARGIN["right"], oy + height - MARGIN["bottom"]
    points = [p for line in lines.values() for p in line]
    x_lo, x_hi = padded_range([p[0] for p in points])
    y_lo, y_hi = padded_range([p[1] for p in points])

    def at(gflop, seconds):
        x = left + (right - left) * (math.log10(gflop) - x_lo) / (x_hi - x_lo)
        y = bottom - (bottom - top) * (math.log10(seconds) - y_lo) / (y_hi - y_lo)
        return x, y

    for value in decade_ticks(x_lo, x_hi):
        x, _ = at(value, 10 ** y_lo)
        draw.line([(x, top), (x, bottom)], fill=GRID)
        draw.text((x - 12, bottom + 4), f"{value:g}", fill="black")
    for value in decade_ticks(y_lo, y_hi):
        _, y = at(10 ** x_lo, value)
        draw.line([(left, y), (right, y)], fill=GRID)
        draw.text((ox + 4, y - 6), tick_label(value), fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, oy + 8), title, fill="black")
    draw.text((left + (right - left) // 2 - 80, bottom + 20), "work (GFLOP); time: median", fill="black")
    for impl, line in lines.items():
        line = sorted(line)
        fill = colour(impl)
        xy = [at(g, s) for g, s in line]
        (g0, s0), (g1, _) = line[0], line[-1]
        dashed(draw, at(g0, s0), at(g1, s0 * g1 / g0), fill)
        if len(xy) > 1:
            draw.line(xy, fill=fill, width=2)
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=fill)


def write_scaling_plot(entries, path, title):
    """Writes the plot of the sweeps among entries to path (PNG); returns False, writing nothing, without any."""
    from PIL import Image, ImageDraw
    panels = sweep_panels(entries)
    if not panels:
        return False
    rows = list(dict.fromkeys(key[:3] for key in panels))
    columns = list(dict.fromkeys(key[3] for key in panels))
    image = Image.new("RGB", (PANEL[0] * len(columns), HEADER + PANEL[1] * len(rows)), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 6), title, fill="black")
    impls = list(dict.fromkeys(impl for panel in panels.values() for impl in panel["lines"]))
    x = 10
    for impl in impls:
        draw.rectangle([x, 26, x + 14, 36], fill=colour(impl))
        draw.text((x + 20, 25), impl, fill="black")
        x += 30 + 7 * len(impl)
    draw.text((x + 10, 25), "dashed: linear in the work from the smallest problem", fill="black")
    for (device, precision, direction, sweep), panel in panels.items():
        origin = (PANEL[0] * columns.index(sweep), HEADER + PANEL[1] * rows.index((device, precision, direction)))
        draw_panel(draw, origin, f"{device} {precision} {direction}: {panel['label']}", panel["lines"])
    image.save(path)
    return True
