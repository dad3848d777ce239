"""The demo: AECR-Net end to end, offline, on the CPU, in a few minutes.

1. makes a small synthetic hazy/clear set (procedural scenes, atmospheric scattering model), train and test;
2. trains AECR-Net briefly (L1 loss; contrastive regularisation needs VGG19 ImageNet weights, which an offline
   demo cannot download, so it is off here);
3. evaluates the hazy input, the Dark Channel Prior and the trained network on the test images;
4. prints the table and writes out/comparison.png (hazy | DCP | AECR-Net | clear), out/loss_curve.png and
   out/results.json.
"""
import json
import os
import time
from typing import Dict, List

import torch

from .data import PairedImages
from .dcp import dehaze_dcp
from .evaluate import evaluate, method_fn
from .inference import dehaze_tensor
from .synthetic import make_synthetic_dataset
from .train import TrainConfig, train


def run_demo(out: str = "demo_out", steps: int = 800, batch_size: int = 4, crop: int = 64, lr: float = 2e-3,
             train_scenes: int = 48, test_scenes: int = 8, size=(96, 128), seed: int = 0,
             progress: bool = True, echo=print) -> Dict:
    start = time.time()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train_dir = make_synthetic_dataset(os.path.join(out, "data", "train"), train_scenes, size, hazes_per_scene=3,
                                       seed=seed)
    test_dir = make_synthetic_dataset(os.path.join(out, "data", "test"), test_scenes, size, hazes_per_scene=1,
                                      seed=seed + 1000, first_id=10001)
    echo(f"synthetic data: {train_scenes * 3} training pairs in {train_dir}, {test_scenes} test pairs in {test_dir}")
    config = TrainConfig(data=train_dir, out=os.path.join(out, "run"), steps=steps, batch_size=batch_size, crop=crop,
                         lr=lr, device="cpu", cr_weight=0.0, seed=seed, log_every=50, progress=progress,
                         cache_images=True)
    summary = train(config, echo=echo)

    from .checkpoint import load_checkpoint
    model = load_checkpoint(summary["last"])
    test = PairedImages(test_dir)
    rows = {
        "hazy input": evaluate(method_fn("hazy"), test),
        "Dark Channel Prior": evaluate(method_fn("dcp"), test),
        "AECR-Net (this run)": evaluate(method_fn("model", model), test),
    }
    table = format_table(rows)
    echo("\n" + table)
    comparison = os.path.join(out, "comparison.png")
    write_comparison(model, test, comparison)
    curve = os.path.join(out, "loss_curve.png")
    write_loss_curve(summary["losses"], curve)
    results = {"results": rows, "steps": steps, "batch_size": batch_size, "crop": crop, "lr": lr,
               "train_pairs": train_scenes * 3, "test_pairs": test_scenes, "seconds": round(time.time() - start, 1),
               "checkpoint": summary["last"], "comparison": comparison, "loss_curve": curve}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    echo(f"\nwrote {comparison} (hazy | DCP | AECR-Net | clear), {curve}, {os.path.join(out, 'results.json')}; "
         f"model {summary['last']}; {results['seconds']:.0f} s in all")
    return results


def format_table(rows: Dict[str, Dict[str, float]]) -> str:
    lines = [f"{'method':<22} {'PSNR (dB)':>10} {'SSIM':>8}", "-" * 42]
    for name, r in rows.items():
        lines.append(f"{name:<22} {r['psnr']:>10.2f} {r['ssim']:>8.4f}")
    return "\n".join(lines)


@torch.no_grad()
def write_comparison(model, test: PairedImages, path: str, count: int = 4) -> None:
    """A grid: one row per test image, columns hazy | DCP | AECR-Net | clear."""
    from .data import save_image
    rows = []
    for i in range(min(count, len(test))):
        hazy, clear, _ = test[i]
        x = hazy[None]
        row = [hazy, dehaze_dcp(x)[0], dehaze_tensor(model, x)[0], clear]
        gap = torch.ones(3, hazy.shape[1], 4)
        rows.append(torch.cat([t if j == 0 else torch.cat([gap, t], 2) for j, t in enumerate(row)], 2))
    spacer = torch.ones(3, 4, rows[0].shape[2])
    grid = torch.cat([r if i == 0 else torch.cat([spacer, r], 1) for i, r in enumerate(rows)], 1)
    save_image(grid, path)


def write_loss_curve(losses: List[float], path: str, size=(640, 360)) -> None:
    """The training loss per step (light) and its running mean (dark), on a log scale, drawn with Pillow."""
    import math
    from PIL import Image, ImageDraw
    w, h = size
    left, right, top, bottom = 60, 20, 24, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    values = [v for v in losses if v > 0 and math.isfinite(v)]
    if values:
        smooth, acc = [], 0.0
        for i, v in enumerate(values):
            acc = 0.95 * acc + 0.05 * v
            smooth.append(acc / (1 - 0.95 ** (i + 1)))  # bias-corrected, so it starts at the first value
        lo, hi = math.log10(min(values)), math.log10(max(values))
        span = hi - lo or 1.0

        def point(i, v):
            x = left + (w - left - right) * (i / max(1, len(values) - 1))
            y = top + (h - top - bottom) * (1 - (math.log10(v) - lo) / span)
            return x, y

        draw.line([point(i, v) for i, v in enumerate(values)], fill=(170, 190, 230), width=1)
        draw.line([point(i, v) for i, v in enumerate(smooth)], fill=(20, 60, 180), width=2)
        draw.text((5, top), f"{10 ** hi:.3f}", fill="black")
        draw.text((5, h - bottom - 10), f"{10 ** lo:.3f}", fill="black")
        draw.text((left, h - bottom + 8), "step 1", fill="black")
        draw.text((w - right - 60, h - bottom + 8), f"step {len(values)}", fill="black")
    draw.text((left + 10, 6), "training loss (L1, log scale); running mean in dark blue", fill="black")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    img.save(path)
