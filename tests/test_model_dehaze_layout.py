"""dehaze_tensor's memory_format: AECR-Net's values in either layout, the output in the input's layout, the caller's
model left as it was."""
import pytest
import torch

from aecr_model import AECRNet, FFANet, dehaze_tensor
from aecr_model.inference import channels_last_weights


def trained_style(**config):
    torch.manual_seed(0)
    model = AECRNet(ngf=8, **config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for layer in model.dcn_layers():
            layer.dcn.conv_offset_mask.weight.normal_(0, 1e-2)
    return model


@pytest.mark.parametrize("config", [{}, {"share_weights": False}, {"mixup": False, "fastdeconv": False}])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("run_in", [None, torch.contiguous_format, torch.channels_last])
def test_aecrnet_dehazes_in_either_layout_to_the_same_values(config, layout, run_in):
    model = trained_style(**config)
    hazy = torch.rand(2, 3, 30, 42)  # padded to 32 x 44 inside
    expected = model(torch.nn.functional.pad(hazy, (0, 2, 0, 2), mode="reflect"))[..., :30, :42].clamp(0, 1)
    got = dehaze_tensor(model, hazy.contiguous(memory_format=layout), memory_format=run_in)
    torch.testing.assert_close(got, expected.detach(), rtol=0, atol=1e-5)  # only the order of the sums differs
    assert got.shape == hazy.shape and got.is_contiguous(memory_format=layout)


def test_channels_last_reaches_the_network():
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            seen.append((x.is_contiguous(memory_format=torch.channels_last),
                         self.conv.weight.is_contiguous(memory_format=torch.channels_last)))
            return self.conv(x)

    probe = Probe()
    dehaze_tensor(probe, torch.rand(1, 3, 8, 8), memory_format=torch.channels_last)
    dehaze_tensor(probe, torch.rand(1, 3, 8, 8))
    assert seen == [(True, True), (False, False)]


def test_an_unknown_memory_format_is_refused_by_name():
    with pytest.raises(ValueError, match="memory_format"):
        dehaze_tensor(trained_style(), torch.rand(1, 3, 8, 8), memory_format=torch.preserve_format)


def test_the_callers_parameters_keep_their_memory_and_values():
    model = trained_style()
    before = {name: (p, p.data_ptr(), p.stride(), p.detach().clone()) for name, p in model.named_parameters()}
    dehaze_tensor(model, torch.rand(1, 3, 16, 20), memory_format=torch.channels_last)
    for name, p in model.named_parameters():
        param, ptr, stride, value = before[name]
        assert p is param and p.data_ptr() == ptr and p.stride() == stride and torch.equal(p, value), name


def test_the_weights_come_back_when_the_forward_raises():
    model = trained_style()
    strides = [p.stride() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="inside"):
        with channels_last_weights(model):
            assert any(p.dim() == 4 and not p.is_contiguous() for p in model.parameters())
            raise RuntimeError("inside")
    assert [p.stride() for p in model.parameters()] == strides


def test_training_after_dehazing_still_reaches_every_parameter():
    model = trained_style().train()
    dehaze_tensor(model, torch.rand(1, 3, 16, 16), memory_format=torch.channels_last)
    model(torch.rand(1, 3, 16, 16)).mean().backward()
    assert all(p.grad is not None and p.grad.is_contiguous() for p in model.parameters())
