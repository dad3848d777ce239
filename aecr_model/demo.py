"""The demo: AECR-Net end to end, offline, on the CPU, in a few minutes.

1. makes a small synthetic hazy/clear set (procedural scenes, atmospheric scattering model), train and test
   (the test images are new ones, made at every run);
2. trains AECR-Net briefly (L1 loss; contrastive regularisation needs VGG19 ImageNet weights, which an offline
   demo cannot download, so it is off here), to show that training works;
3. evaluates the hazy input, the Dark Channel Prior, the network of this run and the reference network shipped
   with the package (REFERENCE: the same recipe on the same training data, trained longer by `make
   demo-reference`: 4000 steps, then 2000 more from there under a cosine schedule over 6000; its training log
   lies beside it) on the test images;
4. prints the table and its time and writes out/comparison.png (hazy | DCP | reference | this run | clear),
   out/loss_curve.png and out/results.json.

Why the short run's output is soft: after 800 steps the network has the colours right (the lowest L1 error of all
methods in the sky, far away and near, and the mean colour within 0.04) but only a third of the clear image's
fine detail (the high-pass energy of its output over the clear image's: 0.32, against 0.59 for the hazy input
and 0.91 for DCP), and halos along depth edges. Fine detail reaches the output only through the encoder's
stride-2 convolution and the decoder's transposed one, which must learn to pass it through; that takes some
thousands of steps (held-out SSIM 0.733 after 800 steps; in a 4000-step run 0.756 at step 1500, 0.786 at
3000, 0.7925 at 4000, still below DCP's 0.794). SSIM, which rewards that detail, is where the hazy input and
DCP lead a short run. Hence the shipped reference.
"""
import json
import os
import shutil
import time
from typing import Dict, List, Optional

import torch

from .data import PairedImages
from .dcp import dehaze_dcp
from .evaluate import evaluate, method_fn
from .inference import dehaze_tensor
from .synthetic import make_synthetic_dataset
from .train import TrainConfig, train

REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo_reference.pt")


def run_demo(out: str = "demo_out", steps: int = 800, batch_size: int = 4, crop: int = 64, lr: float = 2e-3,
             train_scenes: int = 48, test_scenes: int = 8, size=(96, 128), seed: int = 0, arch: str = "aecr",
             reference: Optional[str] = REFERENCE, write_reference: Optional[str] = None,
             progress: bool = True, echo=print) -> Dict:
    """Runs the demo into `out`; returns what it wrote to out/results.json.

    reference: a checkpoint to evaluate beside this run's network (None, or a missing file: none).
    write_reference: also write this run's network there, in float16 (the shipped reference), with its
    training log as <name>.log."""
    start = time.time()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train_dir = make_synthetic_dataset(os.path.join(out, "data", "train"), train_scenes, size, hazes_per_scene=3,
                                       seed=seed)
    # The test scenes are made at every run too, from a seed of their own: no training image is among them.
    test_dir = make_synthetic_dataset(os.path.join(out, "data", "test"), test_scenes, size, hazes_per_scene=1,
                                      seed=seed + 1000, first_id=10001)
    echo(f"synthetic data: {train_scenes * 3} training pairs in {train_dir}, {test_scenes} test pairs in {test_dir}")
    config = TrainConfig(data=train_dir, out=os.path.join(out, "run"), steps=steps, batch_size=batch_size, crop=crop,
                         lr=lr, device="cpu", cr_weight=0.0, seed=seed, log_every=50, progress=progress,
                         cache_images=True, arch=arch)
    summary = train(config, echo=echo)
    if write_reference:
        write_reference_checkpoint(summary["last"], write_reference)
        echo(f"wrote the reference {write_reference} (float16) and its training log")

    from .architectures import ARCHITECTURES
    from .checkpoint import load_checkpoint
    model = load_checkpoint(summary["last"])
    test = PairedImages(test_dir)
    name = "AECR-Net" if arch == "aecr" else arch
    rows = {"hazy input": evaluate(method_fn("hazy"), test), "Dark Channel Prior": evaluate(method_fn("dcp"), test)}
    ref_model, ref_label = None, None
    if reference and os.path.isfile(reference) and not write_reference:
        ref_model = load_checkpoint(reference)
        ref_steps = torch.load(reference, map_location="cpu", weights_only=True).get("step")
        ref_label = f"{'AECR-Net' if ref_model.arch == 'aecr' else ref_model.arch} (shipped, {ref_steps} steps)"
        rows[ref_label] = evaluate(method_fn("model", ref_model), test)
    run_label = f"{name} (this run, {steps} steps)"
    rows[run_label] = evaluate(method_fn("model", model), test)
    elapsed = time.time() - start
    table = format_table(rows)
    best = best_in_both(rows)
    echo("\n" + table)
    echo(f"best in PSNR and in SSIM: {best}" if best else "no method is best in both PSNR and SSIM")
    comparison = os.path.join(out, "comparison.png")
    columns = [("hazy", None), ("DCP", None)] + ([(ref_label, ref_model)] if ref_model is not None else []) + [
        (run_label, model), ("clear", None)]
    write_comparison(columns, test, comparison)
    curve = os.path.join(out, "loss_curve.png")
    write_loss_curve(summary["losses"], curve)
    results = {"results": rows, "best_in_both": best, "arch": arch, "arch_description": ARCHITECTURES[arch],
               "steps": steps, "batch_size": batch_size, "crop": crop, "lr": lr, "train_pairs": train_scenes * 3,
               "test_pairs": test_scenes, "reference": reference if ref_model is not None else None,
               "seconds": round(elapsed, 1), "checkpoint": summary["last"], "comparison": comparison,
               "loss_curve": curve, "columns": [label for label, _ in columns]}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    echo(f"\nwrote {comparison} ({' | '.join(results['columns'])}), {curve}, {os.path.join(out, 'results.json')}; "
         f"model {summary['last']}")
    echo(f"demo time: {elapsed:.0f} s ({elapsed / 60:.1f} min)")
    return results


def best_in_both(rows: Dict[str, Dict[str, float]]) -> Optional[str]:
    """The method with the highest PSNR that also has the highest SSIM, or None."""
    by_psnr = max(rows, key=lambda k: rows[k]["psnr"])
    return by_psnr if by_psnr == max(rows, key=lambda k: rows[k]["ssim"]) else None


def write_reference_checkpoint(source: str, target: str) -> None:
    """A trained checkpoint as the shipped reference: the network, its architecture, step, losses and recipe,
    the weights in float16 (half the size; they load into the float32 network), no optimizer state; and the
    run's train.log beside it as <target without .pt>.log."""
    from .checkpoint import read_checkpoint, save_atomic
    ckpt = read_checkpoint(source, map_location="cpu")
    weights = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    keep = ("format", "version", "arch", "config", "step", "losses", "deconv_counters", "train_config")
    save_atomic({**{k: ckpt[k] for k in keep if k in ckpt}, "model": weights, "weights_dtype": "float16"}, target)
    log = os.path.join(os.path.dirname(source), "train.log")
    if os.path.isfile(log):
        shutil.copyfile(log, os.path.splitext(target)[0] + ".log")


def format_table(rows: Dict[str, Dict[str, float]]) -> str:
    width = max(22, *(len(name) for name in rows))
    lines = [f"{'method':<{width}} {'PSNR (dB)':>10} {'SSIM':>8}", "-" * (width + 20)]
    for name, r in rows.items():
        lines.append(f"{name:<{width}} {r['psnr']:>10.2f} {r['ssim']:>8.4f}")
    return "\n".join(lines)


@torch.no_grad()
def write_comparison(columns, test: PairedImages, path: str, count: int = 4) -> None:
    """A grid: one row per test image, one column per (label, model) of `columns`; the labels "hazy", "DCP"
    and "clear" (model None) stand for the input, the Dark Channel Prior and the clear image."""
    from .data import save_image
    rows = []
    for i in range(min(count, len(test))):
        hazy, clear, _ = test[i]
        x = hazy[None]
        row = []
        for label, model in columns:
            if model is not None:
                row.append(dehaze_tensor(model, x)[0])
            else:
                row.append({"hazy": hazy, "DCP": dehaze_dcp(x)[0], "clear": clear}[label])
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
