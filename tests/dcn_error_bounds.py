"""Per-element rounding bounds for deform_conv2d's output and gradients.

A result computed from inputs rounded to a low precision (unit roundoff u) with a few rounding stages between
(columns stored in the dtype, GEMM outputs rounded once) is within k * u * M of the float64 result of the same
rounded inputs, where M is the sum of the absolute values of the terms that element adds, and k counts the
rounding stages. `magnitudes` computes M for every element of the output and of each gradient, in float64, with
the reference op run on absolute values (bilinear weights are not negative, so this sums |terms|). Comparing each
element against its own M checks small entries (a small offset gradient beside a large one) as strictly as large
ones; a bound scaled by the largest entry of a tensor does not.
"""
import torch

from aecr_ops import reference


def _grid(case, out_h, out_w, dtype):
    """Regular sampling positions of every (tap, output pixel): two [kh*kw, Ho, Wo] tensors."""
    kwargs = case.kwargs()
    (sh, sw), (ph, pw), (dh, dw) = [_pair(kwargs[k]) for k in ("stride", "padding", "dilation")]
    kh, kw = case.kernel
    ys = torch.arange(out_h, dtype=dtype) * sh - ph
    xs = torch.arange(out_w, dtype=dtype) * sw - pw
    ki = torch.arange(kh, dtype=dtype) * dh
    kj = torch.arange(kw, dtype=dtype) * dw
    grid_h = (ki[:, None, None, None] + ys[None, None, :, None]).expand(kh, kw, out_h, out_w)
    grid_w = (kj[None, :, None, None] + xs[None, None, None, :]).expand(kh, kw, out_h, out_w)
    return grid_h.reshape(kh * kw, out_h, out_w), grid_w.reshape(kh * kw, out_h, out_w)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _positions(case, offset):
    """Sampling positions along y and x: two [B, OG*kh*kw, Ho, Wo] tensors (the mask's layout)."""
    b, channels, out_h, out_w = offset.shape
    taps = case.kernel[0] * case.kernel[1]
    off = offset.reshape(b, channels // (2 * taps), taps, 2, out_h, out_w)
    return [(grid + off[:, :, :, axis]).reshape(b, -1, out_h, out_w)
            for axis, grid in enumerate(_grid(case, out_h, out_w, offset.dtype))]


def _mid_cell_offsets(case, offset, axes):
    """Offsets that move each sampling position along `axes` (0: y, 1: x) to the middle of its cell.

    Along y, the derivative of a bilinear sample is sum_c (+-wx_c) x_c over the four corners, so the sum of its
    terms' absolute values is sum_c wx_c |x_c| = 2 * bilinear(|x|, floor(y) + 1/2, x): twice a sample of |x| at
    the middle of the cell (zero where the position is outside the image, as the sample is). Likewise each
    corner's weight moves by at most wx_c * dy, twice its weight at the middle of the cell."""
    b, channels, out_h, out_w = offset.shape
    taps = case.kernel[0] * case.kernel[1]
    off = offset.reshape(b, channels // (2 * taps), taps, 2, out_h, out_w).clone()
    grids = _grid(case, out_h, out_w, offset.dtype)
    for axis in axes:
        pos = grids[axis] + off[:, :, :, axis]
        off[:, :, :, axis] = torch.floor(pos) + 0.5 - grids[axis]
    return off.reshape(offset.shape)


def _abs_problem(case, ax, offset, aw, ab, mask, g):
    """Output and gradients of the reference run on absolute values (every term >= 0): out and a dict of the
    gradients of sum(out * g) by input, weight, mask and (if given) bias."""
    leaves = {"input": ax.detach().requires_grad_(True), "weight": aw.detach().requires_grad_(True),
              "mask": mask.detach().requires_grad_(True)}
    if ab is not None:
        leaves["bias"] = ab.detach().requires_grad_(True)
    out = reference.deform_conv2d(leaves["input"], offset, leaves["weight"], leaves.get("bias"),
                                  mask=leaves["mask"], **case.kwargs())
    grads = torch.autograd.grad((out * g).sum(), list(leaves.values()))
    return out.detach(), dict(zip(leaves, grads))


def magnitudes(case, tensors, grad, coordinate_roundoff=2.0 ** -24):
    """Rounding bounds of the output and of the gradients (input, offset, weight, [bias], [mask]), float64.

    ``tensors``: (input, offset, weight, bias or None, mask or None) as the op gets them; ``grad``: the output's
    gradient; ``coordinate_roundoff``: unit roundoff of the kernels' sampling coordinates (float32 but for float64
    data). Returns (terms, coordinates): for the output and then each gradient, M (the sum of |terms|: a result
    rounded at a few stages is within k * u * M) and the error that coordinates off by
    2 * coordinate_roundoff * (|position| + 1) can cause (a sample next to the image's edge has a small M but a
    large derivative)."""
    x, o, w, b, m = [t.detach().double() if t is not None else None for t in tensors]
    g = grad.detach().double().abs()
    ax, aw = x.abs(), w.abs()
    ab = b.abs() if b is not None else None
    mask_shape = (o.shape[0], o.shape[1] // 2, o.shape[2], o.shape[3])
    am = m.abs() if m is not None else torch.ones(mask_shape, dtype=torch.float64)
    out, terms = _abs_problem(case, ax, o, aw, ab, am, g)
    deltas = [2 * coordinate_roundoff * (p.abs() + 1) for p in _positions(case, o)]

    coords = {"output": torch.zeros_like(out), "input": torch.zeros_like(x), "weight": torch.zeros_like(w),
              "mask": torch.zeros(mask_shape, dtype=torch.float64)}
    offset_terms = []
    for axis in (0, 1):
        # Coordinates off by delta along `axis` move each corner weight by up to wx_c * delta: the problem with
        # positions at the middle of their cells and delta in the mask, twice.
        moved = _mid_cell_offsets(case, o, (axis,))
        out_a, grads_a = _abs_problem(case, ax, moved, aw, None, am * deltas[axis], g)
        coords["output"] += 2 * out_a
        coords["input"] += 2 * grads_a["input"]
        coords["weight"] += 2 * grads_a["weight"]
        # The mask's gradient is sum |g| |w| sample: its samples move by the same; and the offset gradient along
        # `axis` sums |mask| * d(sample)/d(axis), whose terms sum to twice the mask gradient at the middle.
        mid_mask_grad = _abs_problem(case, ax, moved, aw, None, am, g)[1]["mask"]
        coords["mask"] += 2 * mid_mask_grad * deltas[axis]
        offset_terms.append(2 * am * mid_mask_grad)
    # d(sample)/dy is linear in y within a cell and moves with x by at most sum_c |x_c| = 4 * bilinear(|x|) at
    # the middle of the cell along both axes.
    centre = 4 * am * _abs_problem(case, ax, _mid_cell_offsets(case, o, (0, 1)), aw, None, am, g)[1]["mask"]
    offset_coords = [centre * deltas[1], centre * deltas[0]]

    def offset_layout(per_axis):
        return torch.stack(per_axis, dim=2).reshape(o.shape)

    grads = [terms["input"], offset_layout(offset_terms), terms["weight"]]
    grad_coords = [coords["input"], offset_layout(offset_coords), coords["weight"]]
    if b is not None:
        grads.append(terms["bias"])
        grad_coords.append(torch.zeros_like(b))
    if m is not None:
        grads.append(terms["mask"])
        grad_coords.append(coords["mask"])
    return [out] + grads, [coords["output"]] + grad_coords


def worst_ratio(got, expected, magnitude, roundoff, dtype, coordinates=0):
    """max over elements of |got - expected| / (u * M + coordinate error), with an absolute floor of the dtype's
    subnormal spacing (a float16 result below 2^-14 has fewer digits). Returns (ratio, flat index of the worst element)."""
    floor = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    err = (got.double() - expected).abs()
    ratio = err / (roundoff * magnitude + coordinates + floor)
    worst = int(ratio.argmax())
    return ratio.flatten()[worst].item(), worst


def assert_within_rounding(got, expected, magnitude, coordinates, dtype, roundoff, label, factor):
    """Every element within factor * (u * M + coordinate error) of the float64 result (see `magnitudes`)."""
    assert got.dtype == dtype and got.shape == expected.shape, label
    ratio, worst = worst_ratio(got, expected, magnitude, roundoff, dtype, coordinates)
    assert ratio <= factor, (
        f"{label}: element {worst} is {got.flatten()[worst].item():.6g}, float64 gives "
        f"{expected.flatten()[worst].item():.6g}: {ratio:.3g} x u x (sum of |terms| {magnitude.flatten()[worst]:.3g}),"
        f" more than {factor}")
