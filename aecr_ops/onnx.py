"""ONNX export of the aecr ops, for torch.onnx.export(..., dynamo=True).

deform_conv2d maps to the standard ONNX ``DeformConv`` operator (opset 19), whose offset layout (dy, dx per tap,
per offset group), mask, weight groups, offset groups, stride, padding and dilation are the same as ours, so an
exported model needs none of this project's compiled code: ONNX Runtime (1.16 and later) runs it on the CPU.
FastDeconv in eval mode is a plain convolution and exports as one without help.

    torch.onnx.export(model, (x,), "model.onnx", dynamo=True, opset_version=19,
                      custom_translation_table=aecr_ops.onnx.translation_table())
"""
MIN_OPSET = 19


def _deform_conv2d(input, weight, offset, mask, bias, stride, padding, dilation, groups, offset_groups):
    from onnxscript import opset19 as op
    kernel = [weight.shape[2], weight.shape[3]]
    return op.DeformConv(input, weight, offset, bias, mask, dilations=list(dilation), group=groups,
                         kernel_shape=kernel, offset_group=offset_groups,
                         pads=[padding[0], padding[1], padding[0], padding[1]], strides=list(stride))


def translation_table() -> dict:
    """{op overload: ONNX translation} for torch.onnx.export's `custom_translation_table` (needs onnxscript)."""
    import torch
    return {torch.ops.aecr_ops.deform_conv2d.default: _deform_conv2d}
