"""AECRNet: the official structure, parameter count and state dict."""
import pytest
import torch

from aecr_model import AECRNet
from aecr_model.network import count_parameters

OFFICIAL_STATE = """
down1.1.weight 64 3 7 7 | down1.1.bias 64 | down2.0.weight 128 64 3 3 | down2.0.bias 128
down3.0.weight 256 128 3 3 | down3.0.bias 256
block.conv1.weight 256 256 3 3 | block.conv1.bias 256 | block.conv2.weight 256 256 3 3 | block.conv2.bias 256
block.calayer.ca.0.weight 32 256 1 1 | block.calayer.ca.0.bias 32 | block.calayer.ca.2.weight 256 32 1 1 | block.calayer.ca.2.bias 256
block.palayer.pa.0.weight 32 256 1 1 | block.palayer.pa.0.bias 32 | block.palayer.pa.2.weight 1 32 1 1 | block.palayer.pa.2.bias 1
up1.0.weight 256 128 3 3 | up1.0.bias 128 | up2.0.weight 128 64 3 3 | up2.0.bias 64 | up3.1.weight 3 64 7 7 | up3.1.bias 3
dcn_block.dcn.weight 256 256 3 3 | dcn_block.dcn.bias 256
dcn_block.dcn.conv_offset_mask.weight 27 256 3 3 | dcn_block.dcn.conv_offset_mask.bias 27
deconv.weight 3 3 3 3 | deconv.bias 3 | deconv.running_mean 27 | deconv.running_deconv 27 27
mix1.w 1 | mix2.w 1
"""


def official_shapes():
    out = {}
    for item in OFFICIAL_STATE.replace("\n", "|").split("|"):
        if item.strip():
            key, *dims = item.split()
            out[key] = tuple(int(d) for d in dims)
    return out


def test_parameter_count_is_the_papers():
    assert count_parameters(AECRNet()) == 2_614_229


def test_state_dict_keys_and_shapes_are_the_official_ones():
    shapes = {k: tuple(v.shape) for k, v in AECRNet().state_dict().items()}
    assert shapes == official_shapes()


def test_unshared_variant():
    model = AECRNet(share_weights=False)
    assert 9.2e6 < count_parameters(model) < 9.35e6
    assert len({id(b) for b in model.fa_blocks()}) == 6 and len({id(d) for d in model.dcn_layers()}) == 2
    shared = AECRNet()
    assert len({id(b) for b in shared.fa_blocks()}) == 1 and len(shared.fa_blocks()) == 6


def test_initial_mix_weights():
    model = AECRNet()
    assert model.mix1.w.item() == pytest.approx(-1.0) and model.mix2.w.item() == pytest.approx(-0.6)


def test_forward_shapes_and_range():
    model = AECRNet(ngf=8)
    x = torch.rand(2, 3, 24, 32)
    y = model(x)
    assert y.shape == x.shape and y.abs().max() <= 1


def test_forward_refuses_sizes_not_multiple_of_4():
    with pytest.raises(ValueError, match="multiples of 4"):
        AECRNet(ngf=8)(torch.rand(1, 3, 22, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        AECRNet(ngf=8)(torch.rand(1, 4, 24, 32))


def test_gradients_reach_every_parameter():
    model = AECRNet(ngf=8)
    with torch.no_grad():  # offsets away from zero so the DCN's offset branch gets gradients too
        model.dcn_block.dcn.conv_offset_mask.weight.normal_(0, 0.01)
    model(torch.rand(2, 3, 16, 16)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def trained_style(ngf=8, **config):
    torch.manual_seed(0)
    model = AECRNet(ngf=ngf, **config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for layer in model.dcn_layers():
            layer.dcn.conv_offset_mask.weight.normal_(0, 1e-2)
    return model


@pytest.mark.parametrize("config", [{}, {"share_weights": False}, {"mixup": False, "fastdeconv": False}])
def test_the_no_grad_forward_computes_the_autograd_forwards_values(config):
    model = trained_style(**config).eval()
    x = torch.rand(2, 3, 24, 32)
    with torch.no_grad():
        fast = model(x)
    assert fast.is_contiguous()
    # Only the output convolution sums in another order (channels-last, see AECRNet.forward).
    torch.testing.assert_close(fast, model(x).detach(), rtol=0, atol=1e-6)


def test_the_fa_blocks_in_place_path_leaves_its_input_alone():
    block = trained_style().block
    x = torch.randn(1, 32, 12, 16)
    kept = x.clone()
    with torch.no_grad():
        out = block(x)
    assert torch.equal(x, kept) and out.data_ptr() != x.data_ptr()
    assert torch.equal(out, block(x).detach())


def test_the_fa_blocks_in_place_path_keeps_the_promoted_dtype_under_autocast():
    block = trained_style().block
    x = torch.randn(1, 32, 12, 16)  # float32 into bfloat16 convolutions: the sums are float32, as with autograd
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = block(x)
        with torch.no_grad():
            got = block(x)
    assert got.dtype == expected.dtype == torch.float32
    assert torch.equal(got, expected.detach())


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_the_decoders_transposed_convolution_gives_nn_conv_transpose2ds_values(memory_format):
    from aecr_model.network import ConvTranspose2d
    torch.manual_seed(0)
    ours = ConvTranspose2d(16, 8, kernel_size=3, stride=2, padding=1, output_padding=1)
    theirs = torch.nn.ConvTranspose2d(16, 8, kernel_size=3, stride=2, padding=1, output_padding=1)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 10, 12).contiguous(memory_format=memory_format)
    with torch.no_grad():
        fast, expected = ours(x), theirs(x)
    assert torch.equal(fast, expected)
    assert fast.is_contiguous() or memory_format == torch.channels_last
    assert torch.equal(ours(x).detach(), expected)  # the autograd path
    ours.channels_last_out = True
    with torch.no_grad():
        kept = ours(x)
    assert torch.equal(kept, expected) and kept.is_contiguous(memory_format=torch.channels_last)
