"""The `aecr-net` command line (also `python -m aecr_model`): train, evaluate, dehaze, export, profile, demo."""
import argparse
import json
import sys
from typing import List, Optional

import torch


def _device(value: str) -> str:
    if value not in ("cpu", "cuda") and not value.startswith("cuda:"):
        raise argparse.ArgumentTypeError(f"device must be cpu, cuda or cuda:N, got {value!r}")
    return value


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _size(value: str):
    parts = value.lower().split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be N or HxW (e.g. 256 or 480x640), got {value!r}") from None
    if len(numbers) not in (1, 2) or min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"must be N or HxW with positive sizes, got {value!r}")
    return (numbers[0], numbers[-1])


def _non_negative_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return number


def _model_option(value: str):
    """KEY=VALUE for build_model: VALUE an int, a float, true/false, or kept as text."""
    key, sep, text = value.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE (e.g. ngf=32), got {value!r}")
    lowered = text.lower()
    if lowered in ("true", "false"):
        return key, lowered == "true"
    for kind in (int, float):
        try:
            return key, kind(text)
        except ValueError:
            pass
    return key, text


def _add_arch(parser: argparse.ArgumentParser, help: str, options: bool = False, many: bool = False) -> None:
    from .architectures import ARCHITECTURES
    names = ", ".join(f"{name} ({text})" for name, text in ARCHITECTURES.items())
    parser.add_argument("--arch", choices=tuple(ARCHITECTURES), nargs="+" if many else None,
                        default=["aecr"] if many else None, metavar="ARCH", help=f"{help}. One of: {names}")
    if options:
        parser.add_argument("--model-option", type=_model_option, action="append", default=[], dest="model_options",
                            metavar="KEY=VALUE", help="a constructor argument of the network, e.g. ngf=32 (AECR-Net "
                            "widths) or blocks=6 (FFA-Net); repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aecr-net", description="AECR-Net single-image dehazing: train, "
                                     "evaluate and dehaze, on the CPU or CUDA.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a network (writes OUT/last.pt, OUT/best.pt, OUT/train.log)",
                       description="Train AECR-Net (or FFA-Net, or an ablation: --arch) with L1 and contrastive "
                       "regularisation on a paired hazy/clear folder (RESIDE, NH-HAZE/Dense-Haze or h5 layout). "
                       "Several GPUs: torchrun --nproc_per_node N -m aecr_model train ...")
    _add_arch(t, "the network to train (default aecr)", options=True)
    t.add_argument("--data", required=True, help="training folder")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--steps", required=True, type=_positive_int, help="total steps (a resumed run stops there)")
    t.add_argument("--batch-size", type=_positive_int, default=16)
    t.add_argument("--crop", type=_positive_int, default=240, help="random square crop size (multiple of 4)")
    t.add_argument("--lr", type=float, default=2e-4, help="initial learning rate, cosine-decayed per step to 0")
    t.add_argument("--device", type=_device, default="cpu")
    t.add_argument("--cr-weight", type=float, default=0.1, help="weight of the contrastive regularisation (0: off)")
    t.add_argument("--vgg-weights", default=None,
                   help="VGG19 ImageNet weights for CR: a file, or 'random' (default: torchvision's cache)")
    t.add_argument("--negatives", type=_positive_int, default=1, help="negatives per anchor for CR")
    t.add_argument("--cr-ablation", action="store_true", help="positive-only perceptual loss instead of CR")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", default=None, help="checkpoint to continue from (last.pt)")
    t.add_argument("--val-data", default=None, help="validation folder for --eval-every")
    t.add_argument("--eval-every", type=int, default=0, help="evaluate (and save) every N steps")
    t.add_argument("--save-every", type=int, default=0, help="save last.pt every N steps")
    t.add_argument("--log-every", type=_positive_int, default=10)
    t.add_argument("--stop-after", type=_positive_int, default=None,
                   help="stop (and save) after this many steps of this run, as if interrupted")
    t.add_argument("--workers", type=int, default=0, help="data-loading processes")
    t.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    t.add_argument("--unshared", action="store_true", help="the same as --arch aecr-unshared")
    t.add_argument("--cache-images", action="store_true", help="keep decoded training images in memory")
    t.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("evaluate", help="PSNR and SSIM of a checkpoint (or a baseline) on a paired folder")
    e.add_argument("--data", required=True)
    e.add_argument("--checkpoint", default=None)
    _add_arch(e, "the network a checkpoint that does not record it holds (checked against its keys; "
              "checkpoints written by this package record it)")
    e.add_argument("--method", choices=("model", "dcp", "hazy"), default="model",
                   help="model: the checkpoint; dcp: the Dark Channel Prior; hazy: the input unchanged")
    e.add_argument("--device", type=_device, default="cpu")
    e.add_argument("--json", default=None, help="write {psnr, ssim, n} here")
    e.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast on CUDA")
    e.add_argument("--no-progress", action="store_true")

    d = sub.add_parser("dehaze", help="dehaze image files (or folders) into OUT/<name>.png")
    d.add_argument("inputs", nargs="+", metavar="INPUT")
    d.add_argument("--checkpoint", default=None, help="a checkpoint of any --arch (or give --onnx)")
    _add_arch(d, "the network a checkpoint that does not record it holds (checked against its keys)")
    d.add_argument("--onnx", default=None, help="an exported model.onnx, run by ONNX Runtime on the CPU")
    d.add_argument("--out", required=True)
    d.add_argument("--device", type=_device, default="cpu")
    d.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast on CUDA")
    d.add_argument("--tile", type=_non_negative_int, default=0, metavar="N",
                   help="dehaze in tiles of N x N pixels (overlaps included), for images too large to run whole; "
                   "only tiles go to --device, the image stays on the CPU (0: the whole image at once)")
    d.add_argument("--tile-overlap", type=_non_negative_int, default=32, metavar="M",
                   help="context margin of a tile on each side, in pixels (default 32; at least 12 for AECR-Net; "
                   "--tile must be larger than 2 * M)")
    d.add_argument("--no-progress", action="store_true")

    x = sub.add_parser("export", help="export a checkpoint to ONNX (DeformConv, opset >= 19)")
    x.add_argument("--checkpoint", required=True)
    _add_arch(x, "the network a checkpoint that does not record it holds (checked against its keys)")
    x.add_argument("--out", required=True, help="the .onnx file to write")
    x.add_argument("--opset", type=int, default=19)

    p = sub.add_parser("profile", help="parameters, MACs, latency and peak memory of a network",
                       description="Profile architectures at a resolution on a device: parameters, multiply-"
                       "accumulates of the forward (torch.utils.flop_counter, the DCN op included), median latency "
                       "of inference and of a training step (L1, Adam), and peak memory; published figures beside.")
    _add_arch(p, "the networks to profile (default aecr)", options=True, many=True)
    p.add_argument("--checkpoint", default=None, help="profile this checkpoint's network instead of --arch")
    p.add_argument("--size", type=_size, default=(256, 256), metavar="HxW",
                   help="input resolution, N or HxW (default 256x256)")
    p.add_argument("--batch-size", type=_positive_int, default=1)
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--repeat", type=_positive_int, default=5, help="timed runs per latency (median)")
    p.add_argument("--json", default=None, help="also write the rows here")

    m = sub.add_parser("demo", help="the offline CPU demo: synthetic data, brief training, evaluation, pictures")
    m.add_argument("--out", default="demo_out")
    m.add_argument("--steps", type=_positive_int, default=800)
    _add_arch(m, "the network to train (default aecr)")
    m.add_argument("--no-reference", action="store_true",
                   help="leave out the shipped reference network (aecr_model/assets/demo_reference.pt)")
    m.add_argument("--write-reference", default=None, metavar="PATH",
                   help="write this run's network as a reference (float16) and its training log to PATH, .log")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--no-progress", action="store_true")
    return parser


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available here")


def main(argv: Optional[List[str]] = None) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError
    from .losses import VGGWeightsError
    from .onnx_export import OnnxUnavailable
    from .train import NonFiniteLoss

    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (DataError, CheckpointError, VGGWeightsError, NonFiniteLoss, OnnxUnavailable, ValueError) as error:
        print(f"aecr-net {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"aecr-net {args.command}: interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    if args.command == "train":
        from .train import TrainConfig, train
        _check_device(args.device)
        arch = args.arch or ("aecr-unshared" if args.unshared else "aecr")
        if args.unshared and arch != "aecr-unshared":
            raise ValueError(f"--unshared contradicts --arch {arch} (--unshared is --arch aecr-unshared)")
        config = TrainConfig(
            data=args.data, out=args.out, steps=args.steps, batch_size=args.batch_size, crop=args.crop, lr=args.lr,
            device=args.device, cr_weight=args.cr_weight, vgg_weights=args.vgg_weights,
            num_negatives=args.negatives, cr_ablation=args.cr_ablation, seed=args.seed, resume=args.resume,
            val_data=args.val_data, eval_every=args.eval_every, save_every=args.save_every,
            log_every=args.log_every, stop_after=args.stop_after, workers=args.workers, precision=args.precision,
            arch=arch, model_options=dict(args.model_options), cache_images=args.cache_images,
            progress=not args.no_progress)
        train(config)
        return 0
    if args.command == "evaluate":
        from .checkpoint import load_checkpoint
        from .data import PairedImages
        from .evaluate import evaluate, method_fn
        _check_device(args.device)
        model = None
        if args.method == "model":
            if args.checkpoint is None:
                raise ValueError("--checkpoint is needed (or --method dcp / --method hazy)")
            model = load_checkpoint(args.checkpoint, map_location=args.device, arch=args.arch)
        autocast = torch.bfloat16 if args.precision == "bf16" else None
        scores = evaluate(method_fn(args.method, model, autocast), PairedImages(args.data), args.device,
                          progress=not args.no_progress)
        label = args.checkpoint if args.method == "model" else args.method
        print(f"{label} on {args.data}: PSNR {scores['psnr']:.3f} dB, SSIM {scores['ssim']:.4f} ({scores['n']} images)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({**scores, "method": args.method, "checkpoint": args.checkpoint, "data": args.data}, f,
                          indent=2)
        return 0
    if args.command == "dehaze":
        from .checkpoint import load_checkpoint
        from .inference import dehaze_files
        from .tiled import check_tiling
        if (args.checkpoint is None) == (args.onnx is None):
            raise ValueError("give exactly one of --checkpoint and --onnx")
        if args.onnx is not None:
            if args.tile:
                raise ValueError("--tile is not available with --onnx (tile with --checkpoint)")
            from .onnx_export import dehaze_files_onnx
            written = dehaze_files_onnx(args.onnx, args.inputs, args.out, progress=not args.no_progress)
            print(f"wrote {len(written)} image(s) to {args.out} (ONNX Runtime)")
            return 0
        _check_device(args.device)
        model = load_checkpoint(args.checkpoint, map_location=args.device, arch=args.arch)
        check_tiling(args.tile, args.tile_overlap, model, names=("--tile", "--tile-overlap"))
        autocast = torch.bfloat16 if args.precision == "bf16" else None
        written = dehaze_files(model, args.inputs, args.out, args.device, autocast, progress=not args.no_progress,
                               tile=args.tile, overlap=args.tile_overlap)
        print(f"wrote {len(written)} image(s) to {args.out}")
        return 0
    if args.command == "export":
        from .checkpoint import load_checkpoint
        from .onnx_export import export_onnx
        export_onnx(load_checkpoint(args.checkpoint, map_location="cpu", arch=args.arch), args.out, opset=args.opset)
        print(f"wrote {args.out} (ONNX opset {args.opset}; dynamic batch, height and width)")
        return 0
    if args.command == "profile":
        return _profile(args)
    if args.command == "demo":
        from .demo import run_demo
        from .demo import REFERENCE
        run_demo(args.out, steps=args.steps, seed=args.seed, arch=args.arch or "aecr",
                 reference=None if args.no_reference else REFERENCE, write_reference=args.write_reference,
                 progress=not args.no_progress)
        return 0
    raise AssertionError(args.command)


def _profile(args) -> int:
    from .architectures import arch_of, build_model
    from .checkpoint import load_checkpoint
    from .profile import format_profile, profile_model
    _check_device(args.device)
    if args.checkpoint is not None:
        models = [load_checkpoint(args.checkpoint, map_location="cpu")]
    else:
        models = [build_model(arch, **dict(args.model_options)) for arch in args.arch]
    rows = []
    for model in models:
        rows.append(profile_model(model, size=args.size, device=args.device, batch=args.batch_size,
                                  repeat=args.repeat, arch=arch_of(model)))
    print(format_profile(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
