"""FastDeconv (network deconvolution, Ye et al., ICLR 2020): the ops' functional API and the layer."""
import collections
import threading
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import _checks
from ._checks import ArgumentError, ArgumentTypeError, IntPair
from ._extension import require_extension
from .reference import fastdeconv_block, fastdeconv_fold, fastdeconv_initial_buffers, reset_conv_parameters


def patch_statistics(input: Tensor, kernel_size: IntPair, dilation: IntPair = 1, padding: IntPair = 0,
                     sampling_stride: int = 1, block: Optional[int] = None, groups: int = 1,
                     eps: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Mean and covariance of an image's k x k patches, computed without building the unfolded patch matrix.

    The patches are those of ``torch.nn.functional.unfold(input, kernel_size, dilation, padding,
    sampling_stride)`` (zero padding), columns in unfold order ``c*kh*kw + tap``; for a 1x1 kernel, every
    ``sampling_stride**2``-th pixel of the flattened N*H*W grid. With F = kh*kw*block features per matrix:

    - ``groups == 1``: the C/block blocks share one F x F covariance, feature f of block j being column
      ``f*(C/block) + j`` (FastDeconv's interleaved grouping); each patch adds C/block rows.
    - ``groups > 1``: one matrix per group of C/groups channels (``block`` must be C/groups).

    Args:
        input: ``[N, C, H, W]``, float32 or float64.
        block: channels per block (default: C/groups, a single block).
        eps: added to the covariance's diagonal.

    Returns:
        ``mean [groups, F]`` and ``cov [groups, F, F]``: ``cov = X^T X / M + eps*I`` over the M centred rows
        (the biased estimator). Differentiable with respect to ``input``.
    """
    op = "patch_statistics"
    _checks.tensor(input, "input", 4, op)
    if not torch.is_autocast_enabled(input.device.type) and input.dtype not in (torch.float32, torch.float64):
        raise ArgumentTypeError(f"{op}: `input` must be float32 or float64, got {input.dtype}")
    kernel_size = _checks.pair(kernel_size, "kernel_size", 1, op)
    dilation = _checks.pair(dilation, "dilation", 1, op)
    padding = _checks.pair(padding, "padding", 0, op)
    channels = input.shape[1]
    if not isinstance(groups, int) or groups < 1 or channels % groups:
        raise ArgumentError(f"{op}: `groups`={groups!r} must be a positive int dividing the {channels} channels")
    if block is None:
        block = channels // groups
    if not isinstance(sampling_stride, int) or sampling_stride < 1:
        raise ArgumentError(f"{op}: `sampling_stride` must be an int >= 1, got {sampling_stride!r}")
    if groups == 1 and (not isinstance(block, int) or block < 1 or channels % block):
        raise ArgumentError(f"{op}: `block`={block!r} must be a positive int dividing the {channels} channels")
    if groups > 1 and block != channels // groups:
        raise ArgumentError(f"{op}: with groups > 1, `block` must be C/groups = {channels // groups}, got {block!r}")
    require_extension()
    return torch.ops.aecr_ops.patch_statistics(input, list(kernel_size), list(dilation), list(padding),
                                               sampling_stride, block, groups, float(eps))


def isqrt_newton_schulz(a: Tensor, n_iter: int = 5) -> Tensor:
    """Inverse square root of symmetric positive-definite matrices by the coupled Newton-Schulz iteration.

    ``Y = A/||A||_F, Z = I``; ``n_iter`` times ``T = (3I - ZY)/2, Y = YT, Z = TZ``; returns ``Z/sqrt(||A||_F)``.
    This is exactly the original FastDeconv's ``isqrt_newton_schulz_autograd`` (not converged: a fixed number
    of steps), with a backward that keeps no iterates.

    Up to 48 features the iteration runs as written (one fused kernel for the whole batch). Above, on CUDA, it
    runs as batched GEMMs (3*n_iter products, 6*n_iter more in the backward), so that no call waits for the GPU
    and CUDA graphs can capture it. Above 48 on the CPU, since every iterate is a polynomial in Y, it runs on Y's
    eigenvalues: one symmetric eigendecomposition instead of the products. That form needs symmetric matrices
    (covariances are) and refuses others.

    Args:
        a: ``[F, F]`` or ``[B, F, F]``, float32 or float64.
    Returns:
        the same shape as ``a``.
    """
    op = "isqrt_newton_schulz"
    if not isinstance(a, Tensor):
        raise ArgumentTypeError(f"{op}: `a` must be a torch.Tensor, got {type(a).__name__}")
    if a.dim() not in (2, 3) or a.shape[-1] != a.shape[-2] or a.shape[-1] == 0:
        raise ArgumentError(f"{op}: `a` must be [F, F] or [B, F, F] with F > 0, got shape {list(a.shape)}")
    if not torch.is_autocast_enabled(a.device.type) and a.dtype not in (torch.float32, torch.float64):
        raise ArgumentTypeError(f"{op}: `a` must be float32 or float64, got {a.dtype}")
    if not isinstance(n_iter, int) or isinstance(n_iter, bool) or n_iter < 0:
        raise ArgumentError(f"{op}: `n_iter` must be an int >= 0, got {n_iter!r}")
    require_extension()
    if a.dim() == 2:
        return torch.ops.aecr_ops.isqrt_newton_schulz(a.unsqueeze(0), n_iter)[0][0]
    return torch.ops.aecr_ops.isqrt_newton_schulz(a, n_iter)[0]


_PENDING_LIMIT = 16  # CUDA verdicts a FastDeconv layer lets the host run ahead by before waiting for one


class _PendingVerdicts:
    """The finiteness verdicts of CUDA batches that have not come back yet, oldest first.

    Each entry is ``(flag, event)``: once ``event`` has completed, ``bool(flag)`` is the verdict (True: finite).
    Events need only ``query()`` and ``synchronize()``, so that the queue can be tested with fake ones. Every
    verdict is handed back exactly once, by :meth:`poll` as soon as its event has completed (whatever the
    state of older ones: events of different streams or devices complete in any order) or by :meth:`push`,
    which waits for the oldest entries while more than ``limit`` are queued, so that a host far ahead of the
    GPU keeps a bounded queue. Thread-safe (DataParallel's replicas share their module's queue). Copies and
    pickles are empty queues: events neither copy nor pickle, and a copy must not report the original's batches.
    """

    def __init__(self, limit: int = _PENDING_LIMIT):
        if not isinstance(limit, int) or limit < 1:
            raise ArgumentError(f"_PendingVerdicts: `limit` must be a positive int, got {limit!r}")
        self.limit = limit
        self._entries = collections.deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __reduce__(self):
        return _PendingVerdicts, (self.limit,)

    def push(self, flag, event) -> List[bool]:
        """Queues a verdict; returns, oldest first, those it waited for to bring the queue back to ``limit``."""
        with self._lock:
            self._entries.append((flag, event))
            overflow = []
            while len(self._entries) > self.limit:
                overflow.append(self._entries.popleft())
        verdicts = []
        for flag, event in overflow:
            event.synchronize()
            verdicts.append(bool(flag))
        return verdicts

    def poll(self, wait: bool = False) -> List[bool]:
        """Removes and returns, oldest first, the verdicts whose events have completed (all of them, after
        waiting for each, when ``wait``)."""
        with self._lock:
            entries, self._entries = self._entries, collections.deque()
            done = []
            for flag, event in entries:
                if not wait and not event.query():
                    self._entries.append((flag, event))
                else:
                    done.append((flag, event))
        verdicts = []
        for flag, event in done:
            if wait:
                event.synchronize()
            verdicts.append(bool(flag))
        return verdicts


def _capturing(device: torch.device) -> bool:
    """Whether this thread is capturing a CUDA graph, on the current stream of the current device or of
    ``device`` (a CUDA graph capture in global mode forbids querying or waiting for events)."""
    if not torch.cuda.is_initialized():  # also keeps CPU-only builds and machines without a driver out
        return False
    if torch.cuda.is_current_stream_capturing():
        return True
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _queue_cuda_verdict(finite: Tensor):
    """Starts bringing a CUDA verdict back: ``(pinned flag, event)``, both the copy and the event on the current
    stream of ``finite``'s device (not of the current device, which may be another one); None while a CUDA graph
    is being captured (neither a per-step pinned buffer nor an event can be captured)."""
    device = finite.device
    if _capturing(device):
        return None
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_(finite, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    return flag, event


class FastDeconv(nn.Module):
    """Network deconvolution: a convolution whose input patches are whitened (Ye et al., ICLR 2020).

    The layer of yechengxi/deconvolution that AECR-Net uses, with the same constructor, defaults, block rule,
    buffers and results (outputs, gradients, running buffers, step after step, train and eval). Its state dict
    is exactly ``weight``, ``bias``, ``running_mean``, ``running_deconv``, so official checkpoints load.

    Training (not frozen): statistics of the input's patches (taken every ``sampling_stride * stride`` pixels),
    ``deconv`` = their covariance's inverse square root by ``n_iter`` Newton-Schulz steps, running buffers moved
    by ``momentum`` towards them, and ``conv2d(x, W deconv, bias - W deconv mean)``. Eval, or training after
    ``freeze_iter`` calls when ``freeze=True``: the same with the running buffers; the layer is then a plain
    convolution whose folded weight is computed once and reused until the parameters or buffers change.

    Unlike the original: a batch whose statistics are not finite does not touch the running buffers (the output of
    that batch is what the statistics make it); ``bias=False`` works; an empty batch leaves the statistics alone.

    Each non-finite batch gives one RuntimeWarning. On the CPU it comes from the call itself. On CUDA the check
    does not wait for the GPU: its verdict is copied back asynchronously, on the current stream of the layer's
    device, and the warning (which says it is reported late) comes from the first later call that finds it
    back, however many calls later; a host running ahead of the GPU waits for the oldest verdict only once
    more than 16 of this layer's are outstanding. The last batches' verdicts are reported only if the layer is
    called again. Two cases skip the check on the host, the running buffers staying protected (one kernel
    updates both or neither) but nothing being reported: under ``torch.compile``, and while a CUDA graph is
    being captured (``torch.cuda.graph``), since neither can hold the per-step pinned flag and event; replays of
    such a graph are not reported either.

    Shapes: ``forward(x [N, C_in, H, W]) -> [N, C_out, Ho, Wo]`` as ``nn.Conv2d``.

    Example::

        >>> layer = aecr_ops.FastDeconv(3, 3, kernel_size=3, stride=1, padding=1)
        >>> layer(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1, bias: bool = True, eps: float = 1e-5,
                 n_iter: int = 5, momentum: float = 0.1, block: int = 64, sampling_stride: int = 3,
                 freeze: bool = False, freeze_iter: int = 100):
        super().__init__()
        name = "FastDeconv"
        for value, label in ((in_channels, "in_channels"), (out_channels, "out_channels"), (groups, "groups"),
                             (block, "block"), (sampling_stride, "sampling_stride"), (freeze_iter, "freeze_iter")):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ArgumentError(f"{name}: `{label}` must be a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ArgumentError(f"{name}: `groups`={groups} must divide in_channels={in_channels} and "
                                f"out_channels={out_channels}")
        if not isinstance(n_iter, int) or n_iter < 0:
            raise ArgumentError(f"{name}: `n_iter` must be an int >= 0, got {n_iter!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _checks.pair(kernel_size, "kernel_size", 1, name)
        self.stride = _checks.pair(stride, "stride", 1, name)
        if self.stride[0] != self.stride[1]:
            raise ArgumentError(f"{name}: `stride` must be the same along both axes, got {stride!r}")
        self.padding = _checks.pair(padding, "padding", 0, name)
        self.dilation = _checks.pair(dilation, "dilation", 1, name)
        self.eps, self.n_iter, self.momentum = float(eps), n_iter, float(momentum)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        reset_conv_parameters(self.weight, self.bias)

        self.block = fastdeconv_block(in_channels, block, groups)
        self.num_features = self.kernel_size[0] * self.kernel_size[1] * self.block
        mean, deconv = fastdeconv_initial_buffers(in_channels, self.kernel_size, self.block, groups)
        self.register_buffer("running_mean", mean)
        self.register_buffer("running_deconv", deconv)
        self.sampling_stride = sampling_stride * self.stride[0]
        self.freeze, self.freeze_iter = freeze, freeze_iter
        # Training calls modulo 10*freeze_iter; a tensor so that torch.compile does not recompile as it counts.
        self.register_buffer("counter", torch.zeros((), dtype=torch.long), persistent=False)
        self._fold_cache = None
        self._verdicts = _PendingVerdicts()  # CUDA: the finiteness checks not yet back (not copied with the layer)

    def forward(self, x: Tensor) -> Tensor:
        autocast = torch.is_autocast_enabled(x.device.type) if isinstance(x, Tensor) else False
        _checks.tensor(x, "x", 4, "FastDeconv")
        if x.shape[1] != self.in_channels:
            raise ArgumentError(f"FastDeconv: `x` must have {self.in_channels} channels, got shape {list(x.shape)}")
        if not autocast and x.dtype != self.weight.dtype:
            raise ArgumentTypeError(f"FastDeconv: `x` has dtype {x.dtype} but the layer is {self.weight.dtype}; "
                                    f"convert one of them (e.g. layer.to({x.dtype}))")
        if not torch.compiler.is_compiling() and len(self._verdicts):
            self._report_non_finite(x.device)
        frozen = self.freeze and bool(self.counter > self.freeze_iter)
        if self.training:
            with torch.no_grad():
                self.counter.add_(1).remainder_(self.freeze_iter * 10)
        if self.training and not frozen and x.shape[0] > 0:
            mean, cov = patch_statistics(x, self.kernel_size, self.dilation, self.padding, self.sampling_stride,
                                         self.block, self.groups, self.eps)
            deconv = isqrt_newton_schulz(cov, self.n_iter)
            mean = mean.reshape(-1)
            if self.groups == 1:
                deconv = deconv[0]
            self._update_running(mean.detach(), deconv.detach())
            w, b = fastdeconv_fold(self.weight, self.bias, mean, deconv, self.groups, self.num_features)
        else:
            w, b = self._folded_from_running()
        if x.device.type == "cpu" and self.in_channels <= 4:
            # oneDNN pads a few channels to a block of 16 in the default layout: on the CPU a 3->3 convolution
            # (AECR-Net's) runs about 3x faster, both ways, in channels-last (benchmarks/bench_fastdeconv.py).
            y = torch.nn.functional.conv2d(x.contiguous(memory_format=torch.channels_last), w, b, self.stride,
                                           self.padding, self.dilation, self.groups)
            return y.contiguous()
        return torch.nn.functional.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _update_running(self, mean: Tensor, deconv: Tensor) -> None:
        with torch.no_grad():  # one kernel: both buffers move, or neither (a non-finite batch)
            finite = torch.ops.aecr_ops.fastdeconv_update_running(
                self.running_mean, self.running_deconv, mean.to(self.running_mean.dtype),
                deconv.to(self.running_deconv.dtype), self.momentum)
        if torch.compiler.is_compiling():
            return
        if finite.is_cuda:
            # No synchronisation per step: the verdict comes back asynchronously and a later call reports it.
            pending = _queue_cuda_verdict(finite)
            if pending is not None:  # None while a CUDA graph is being captured
                for ok in self._verdicts.push(*pending):
                    if not ok:
                        self._warn_non_finite(late=True)
        elif not bool(finite):
            self._warn_non_finite(late=False)

    def __setstate__(self, state):
        # Pickles of earlier versions hold `_pending_finite` (always None there) instead of the queue.
        state = dict(state)
        state.pop("_pending_finite", None)
        state.setdefault("_verdicts", _PendingVerdicts())
        super().__setstate__(state)

    def _report_non_finite(self, device: torch.device, wait: bool = False) -> None:
        """Warns once for each non-finite CUDA batch whose verdict has come back (all of them, waiting, when
        ``wait``); nothing while a CUDA graph is being captured, where events can be neither queried nor waited
        for."""
        if _capturing(device):
            return
        for ok in self._verdicts.poll(wait):
            if not ok:
                self._warn_non_finite(late=True)

    @staticmethod
    def _warn_non_finite(late: bool) -> None:
        # Called from a method that forward calls, so that stacklevel 4 names the same frame for every warning.
        note = " (reported late: CUDA checks do not wait for the GPU)" if late else ""
        warnings.warn("FastDeconv: the batch statistics are not finite (NaN or inf in the input?); the running "
                      f"buffers were left unchanged{note}", RuntimeWarning, stacklevel=4)

    def _folded_from_running(self) -> Tuple[Tensor, Tensor]:
        """The plain convolution the layer is with its running buffers; cached while nothing changes."""
        params = [self.weight] + ([self.bias] if self.bias is not None else [])
        tensors = params + [self.running_mean, self.running_deconv]
        cacheable = not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(p.requires_grad for p in params))
        if not cacheable or any(t.is_inference() for t in tensors):  # inference tensors have no _version
            return fastdeconv_fold(self.weight, self.bias, self.running_mean, self.running_deconv, self.groups,
                                   self.num_features)
        # Under autocast the fold's matmuls give the autocast dtype: a cache made there must not serve outside.
        device = self.weight.device.type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        # A fold made under inference_mode is an inference tensor, which autograd may not save for backward: it
        # serves inference mode only.
        key = (autocast, torch.is_inference_mode_enabled())
        key += tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)
        if self._fold_cache is None or self._fold_cache[0] != key:
            with torch.no_grad():
                folded = fastdeconv_fold(self.weight, self.bias, self.running_mean, self.running_deconv,
                                         self.groups, self.num_features)
            self._fold_cache = (key, folded)
        return self._fold_cache[1]

    def reset_fold_cache(self) -> None:
        """Forget the folded eval weight (needed only after changing parameters through ``.data``)."""
        self._fold_cache = None

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, block={self.block}, eps={self.eps}, n_iter={self.n_iter}, "
                f"momentum={self.momentum}, sampling_stride={self.sampling_stride}, freeze={self.freeze}")
