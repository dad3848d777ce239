"""ONNX Runtime's DeformConv (the standard operator, opset 19) on the CPU: a baseline of the DCN forward groups.

A one-node ONNX model per problem, built with onnx.helper, run by an onnxruntime.InferenceSession:

    X       [B, C_in, H, W]
    W       [C_out, C_in / groups, kh, kw]
    offset  [B, 2 * offset_groups * kh * kw, Ho, Wo]   (dy, dx per tap and offset group: aecr's layout)
    B       [C_out]
    mask    [B, offset_groups * kh * kw, Ho, Wo]
    -> Y    [B, C_out, Ho, Wo],  Ho = (H + 2 * pad_h - (dil_h * (kh - 1) + 1)) // stride_h + 1  (Wo alike)

Bias is required (every problem of the suite has one); without a mask (None) the node has four inputs. Sessions are cached per problem (shapes, dtype,
stride, padding, dilation, groups, offset groups) and thread count; onnx and onnxruntime are imported only here,
when a session is first made, so the rest of the suite runs without them.
"""
import functools

import torch

INPUTS = ("X", "offset", "W", "B", "mask")  # in the order of fn(x, offset, weight, bias, mask)
NODE_INPUTS = ("X", "W", "offset", "B", "mask")  # in DeformConv's order
OPSET = 19


def pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def deform_conv_model(shapes, dtype, stride, padding, dilation, groups, offset_groups):
    """The ONNX model of one DeformConv node; shapes are those of (x, offset, weight, bias, mask), the mask's None
    where there is none."""
    import numpy as np
    from onnx import helper
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inputs = [helper.make_tensor_value_info(name, elem, shape) for name, shape in zip(INPUTS, shapes)
              if shape is not None]
    output = helper.make_tensor_value_info("Y", elem, None)
    (ph, pw), kernel = padding, list(shapes[2][2:])
    node_inputs = [name for name in NODE_INPUTS if name != "mask" or shapes[4] is not None]
    node = helper.make_node("DeformConv", node_inputs, ["Y"], kernel_shape=kernel, pads=[ph, pw, ph, pw],
                            strides=list(stride), dilations=list(dilation), group=groups,
                            offset_group=offset_groups)
    graph = helper.make_graph([node], "deform_conv", inputs, [output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def session_options(threads):
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Without these, ONNX Runtime's pool threads spin after each run, waiting for more work, and take the cores
    # from the torch call that follows (the next benchmark, or aecr's check), which then runs slower.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


@functools.cache
def session_for(shapes, dtype, stride, padding, dilation, groups, offset_groups, threads):
    """The CPU session of a problem and thread count (made once, then cached)."""
    import onnxruntime
    model = deform_conv_model(shapes, dtype, stride, padding, dilation, groups, offset_groups)
    return onnxruntime.InferenceSession(model.SerializeToString(), session_options(threads),
                                        providers=["CPUExecutionProvider"])


def arrays_of(tensors):
    """{input name: numpy array} of CPU tensors (x, offset, weight, bias, mask; the mask may be None, then left
    out); the arrays share their memory."""
    return {name: t.detach().numpy() for name, t in zip(INPUTS, tensors) if t is not None}


def deform_conv2d_for(tensors, stride=1, padding=0, dilation=1, groups=1, offset_groups=1):
    """fn(x, offset, weight, bias, mask) -> Y, ONNX Runtime's DeformConv on the CPU with torch.get_num_threads()
    threads, for the problem of `tensors` (x, offset, weight, bias, mask: CPU tensors, as bench_dcn.make_problem
    makes them). Their numpy arrays are made here, once: a call with these same tensors is session.run alone;
    other tensors (of the same shapes) are converted at the call. fn.session is its session."""
    shapes = tuple(None if t is None else tuple(t.shape) for t in tensors)
    dtype = str(tensors[0].dtype).removeprefix("torch.")
    session = session_for(shapes, dtype, pair(stride), pair(padding), pair(dilation), groups, offset_groups,
                          torch.get_num_threads())
    prepared = arrays_of(tensors)

    def fn(x, offset, weight, bias, mask):
        given = (x, offset, weight, bias, mask)
        same = all(a is b for a, b in zip(given, tensors))
        return torch.from_numpy(session.run(None, prepared if same else arrays_of(given))[0])

    fn.session = session
    return fn
