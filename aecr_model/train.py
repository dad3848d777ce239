"""Training of AECR-Net (or any network of architectures.ARCHITECTURES: FFA-Net, the ablations): L1 + beta *
contrastive regularisation, Adam with per-step cosine decay.

Every batch is a pure function of (seed, step) (see data.TrainBatches) and every checkpoint holds the model,
the optimizer, the FastDeconv counters and the step, so a run resumed from last.pt continues exactly: on the CPU
bitwise the same parameters as a run that was never interrupted. `steps` is the total: the cosine schedule runs
over it, and a resumed run stops there.
"""
import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from . import host_memory
from .checkpoint import read_checkpoint, save_atomic, save_checkpoint
from .data import PairedImages, TrainBatches
from .evaluate import evaluate, method_fn
from .architectures import build_model, check_arch
from .losses import ContrastiveRegularization

PRECISIONS = ("auto", "fp32", "bf16")


@dataclasses.dataclass
class TrainConfig:
    data: str
    out: str
    steps: int
    batch_size: int = 16
    crop: int = 240
    lr: float = 2e-4
    device: str = "cpu"
    cr_weight: float = 0.1
    vgg_weights: Optional[str] = None
    num_negatives: int = 1
    cr_ablation: bool = False
    seed: int = 0
    resume: Optional[str] = None
    val_data: Optional[str] = None
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 10
    stop_after: Optional[int] = None
    workers: int = 0
    precision: str = "auto"
    arch: str = "aecr"
    model_options: Dict[str, Any] = dataclasses.field(default_factory=dict)  # to build_model, e.g. {"ngf": 32}
    cache_images: bool = False
    progress: bool = True

    def check(self) -> None:
        check_arch(self.arch, "arch")
        positive = {"steps": self.steps, "batch_size": self.batch_size, "crop": self.crop, "log_every": self.log_every}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"train: `{name}` must be >= 1, got {value}")
        if self.crop % 4:
            raise ValueError(f"train: `crop` must be a multiple of 4 (the network halves it twice), got {self.crop}")
        if not self.lr > 0:
            raise ValueError(f"train: `lr` must be > 0, got {self.lr}")
        if self.cr_weight < 0:
            raise ValueError(f"train: `cr_weight` must be >= 0, got {self.cr_weight}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train: `precision` must be one of {PRECISIONS}, got {self.precision!r}")
        if self.eval_every < 0 or self.save_every < 0 or self.workers < 0:
            raise ValueError("train: `eval_every`, `save_every` and `workers` must be >= 0")
        if self.eval_every and not self.val_data:
            raise ValueError("train: `eval_every` needs `val_data`")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("train: device cuda asked for, but no CUDA GPU is available")


def cosine_lr(step: int, total: int, base: float) -> float:
    """The official per-step schedule: 0.5 (1 + cos(pi step / total)) base, for steps 1 .. total."""
    return 0.5 * (1 + math.cos(step * math.pi / total)) * base


class RunLog:
    """Appends timestamped lines to out/train.log and shows them (above the progress bar)."""

    def __init__(self, path: str, enabled: bool, echo):
        self.path, self.enabled, self.echo = path, enabled, echo

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        with open(self.path, "a") as f:
            f.write(line + "\n")
        self.echo(line)


def _fastdeconv_layers(model) -> List[Any]:
    import aecr_ops
    return [m for m in model.modules() if isinstance(m, aecr_ops.FastDeconv)]


class _Distributed:
    """torchrun's environment: rank, world size and the device of this process."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = 0
        self.device = device
        self.owns_group = False
        if self.world > 1:
            import torch.distributed as dist
            cuda = device.startswith("cuda")
            if not dist.is_initialized():
                dist.init_process_group("nccl" if cuda else "gloo")
                self.owns_group = True
            self.rank = dist.get_rank()
            if cuda:
                local = int(os.environ.get("LOCAL_RANK", "0"))
                torch.cuda.set_device(local)
                self.device = f"cuda:{local}"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist
            dist.destroy_process_group()


class NonFiniteLoss(RuntimeError):
    pass


class _StopRequests:
    """Turns the first SIGINT or SIGTERM into a request to stop after the current step (so a checkpoint is never
    taken in the middle of an optimizer update); a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(config: TrainConfig, echo=print) -> Dict[str, Any]:
    """Runs (or resumes) a training run; returns a summary. Writes out/last.pt, out/best.pt and out/train.log."""
    config.check()
    dist = _Distributed(config.device)
    device = dist.device
    if config.batch_size % dist.world:
        raise ValueError(f"train: the batch size {config.batch_size} must be divisible by the {dist.world} processes")
    os.makedirs(config.out, exist_ok=True)
    log = RunLog(os.path.join(config.out, "train.log"), dist.main, echo)
    last_path, best_path = os.path.join(config.out, "last.pt"), os.path.join(config.out, "best.pt")

    torch.manual_seed(config.seed)
    model = build_model(config.arch, **config.model_options)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
    state = {"step": 0, "losses": [], "evals": [], "best_psnr": None, "best_ssim": None, "best_step": None}
    if config.resume:
        ckpt = read_checkpoint(config.resume, map_location="cpu")
        if ckpt["arch"] != config.arch or {**model.config, **ckpt["config"]} != model.config:
            raise ValueError(f"train: {config.resume} holds a {ckpt['arch']} network ({ckpt['config']}), not the "
                             f"{config.arch} ({model.config}) asked for")
        model.load_state_dict(ckpt["model"])
        if "optimizer" in ckpt and ckpt["optimizer"]:
            optimizer.load_state_dict(ckpt["optimizer"])
        for layer, counter in zip(_fastdeconv_layers(model), ckpt.get("deconv_counters", [])):
            layer.counter.fill_(int(counter))
        for key in state:
            if key in ckpt:
                state[key] = ckpt[key]
        previous = ckpt.get("train_config", {})
        if previous.get("steps") not in (None, config.steps):
            log(f"note: {config.resume} comes from a {previous['steps']}-step run; its cosine schedule differed "
                f"from this {config.steps}-step one up to step {state['step']}")
        log(f"resumed from {config.resume} at step {state['step']}")
    model.to(device)
    _optimizer_to(optimizer, device)

    net = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    criterion_cr = None
    if config.cr_weight > 0:
        criterion_cr = ContrastiveRegularization(config.vgg_weights, config.num_negatives, config.cr_ablation,
                                                 seed=config.seed).to(device)
    autocast_dtype = torch.bfloat16 if (config.precision == "bf16" or (
        config.precision == "auto" and device.startswith("cuda"))) else None

    images = PairedImages(config.data, cache=config.cache_images)
    val_images = PairedImages(config.val_data) if config.val_data else None
    per_rank = config.batch_size // dist.world
    batches = TrainBatches(images, per_rank, config.crop, config.seed)
    start = state["step"]
    end = config.steps if config.stop_after is None else min(config.steps, start + config.stop_after)
    sample_steps = [(step - 1) * dist.world + dist.rank + 1 for step in range(start + 1, end + 1)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=sample_steps,
                                         num_workers=config.workers, pin_memory=device.startswith("cuda"))
    if dist.main:
        log(f"training {config.arch} ({sum(p.numel() for p in model.parameters()):,} parameters): "
            f"{json.dumps(dataclasses.asdict(config))}")
        log(f"{len(images)} training pairs in {config.data}; steps {start + 1}..{end} of {config.steps}; "
            f"device {device}{' x ' + str(dist.world) if dist.world > 1 else ''}; "
            f"precision {'bf16 autocast' if autocast_dtype else 'fp32'}; "
            f"CR {'off' if criterion_cr is None else f'weight {config.cr_weight}'}")

    def checkpoint(path: str) -> None:
        if dist.main:
            save_checkpoint(path, model, optimizer=optimizer.state_dict(), step=state["step"],
                            losses=state["losses"], evals=state["evals"], best_psnr=state["best_psnr"],
                            best_ssim=state["best_ssim"], best_step=state["best_step"],
                            deconv_counters=[int(m.counter) for m in _fastdeconv_layers(model)],
                            train_config=dataclasses.asdict(config))

    def run_eval() -> None:
        if dist.main:
            model.eval()
            scores = evaluate(method_fn("model", model), val_images, device)  # in fp32, as the paper measures
            model.train()
            state["evals"].append({"step": state["step"], **scores})
            improved = state["best_psnr"] is None or scores["psnr"] > state["best_psnr"]
            log(f"eval step {state['step']}: PSNR {scores['psnr']:.3f} dB, SSIM {scores['ssim']:.4f} on "
                f"{scores['n']} images{' (best so far)' if improved else ''}")
            if improved:
                state["best_psnr"], state["best_ssim"], state["best_step"] = scores["psnr"], scores["ssim"], state["step"]
                checkpoint(best_path)
        dist.barrier()

    bar = None
    if config.progress and dist.main:
        from tqdm import tqdm
        bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
        log.echo = bar.write
    model.train()
    interrupted = False
    t_last = time.perf_counter()
    try:
        # On the CPU the memory each step frees serves the next one (host_memory): no fresh pages to fault in.
        with _StopRequests() as stop, host_memory.retain_freed_memory(torch.device(device).type == "cpu"):
            for step, (hazy, clear) in zip(range(start + 1, end + 1), loader):
                lr = cosine_lr(step, config.steps, config.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                hazy, clear = hazy.to(device, non_blocking=True), clear.to(device, non_blocking=True)
                with torch.autocast(torch.device(device).type, dtype=autocast_dtype or torch.bfloat16,
                                    enabled=autocast_dtype is not None):
                    out = net(hazy)
                    l1 = F.l1_loss(out.float(), clear)
                    cr = (criterion_cr(out.float(), clear, hazy) if criterion_cr is not None
                          else torch.zeros((), device=device))
                    loss = l1 + config.cr_weight * cr
                value = loss.item()
                cr = cr.detach()
                if not math.isfinite(value):
                    raise NonFiniteLoss(f"the loss became {value} at step {step}; stopping. The last good checkpoint "
                                        f"is {last_path} (step {state['step']}); lower --lr or --cr-weight")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                state["step"] = step
                state["losses"].append(value)
                now = time.perf_counter()
                speed = config.batch_size / max(now - t_last, 1e-9)
                t_last = now
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")
                if step % config.log_every == 0 or step == end:
                    log(f"step {step}/{config.steps} loss {value:.5f} l1 {l1.item():.5f} cr {cr.item():.5f} "
                        f"lr {lr:.3e} {speed:.1f} img/s")
                if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
                    run_eval()
                    checkpoint(last_path)
                elif config.save_every and step % config.save_every == 0:
                    checkpoint(last_path)
                if stop.requested:
                    interrupted = True
                    log(f"stop requested: stopping after step {step}, saving {last_path}")
                    break
    finally:
        if bar is not None:
            bar.close()
    if state["step"] > start or not os.path.exists(last_path):
        checkpoint(last_path)
    if dist.main and state["step"] >= config.steps and not config.val_data:
        # Without validation data there is nothing to pick a best model by: the final one stands for it.
        save_atomic(torch.load(last_path, map_location="cpu", weights_only=True), best_path)
    dist.barrier()
    dist.close()
    if interrupted:
        raise KeyboardInterrupt
    summary = {"step": state["step"], "final_loss": state["losses"][-1] if state["losses"] else None,
               "best_psnr": state["best_psnr"], "best_ssim": state["best_ssim"], "best_step": state["best_step"],
               "last": last_path, "best": best_path if os.path.exists(best_path) else None,
               "losses": state["losses"]}
    if dist.main:
        log(f"done at step {state['step']}: last {last_path}"
            + (f", best {best_path} (step {state['best_step']}, PSNR {state['best_psnr']:.3f})"
               if state["best_psnr"] is not None else ""))
    return summary


def _optimizer_to(optimizer: torch.optim.Optimizer, device: str) -> None:
    for group_state in optimizer.state.values():
        for key, value in group_state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                group_state[key] = value.to(device)
