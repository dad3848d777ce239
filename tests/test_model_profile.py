"""aecr_model.profile: parameters, MACs (checked against a hand count from the layer shapes), latency, peak memory,
the table, and the size checks."""
import pytest
import torch
from torch import nn

from aecr_model.network import AECRNet
from aecr_model.profile import PUBLISHED, PUBLISHED_SOURCE, format_profile, profile_model


def aecr_hand_flops(ngf, height, width, batch=1, channels=3):
    """AECRNet's forward FLOPs (2 per MAC) in eval mode, from its layer shapes, as flop_counter counts them with
    aecr_ops.flops' DCN formula: every convolution (transposed ones by their input pixels), the DCN's dense part
    plus its sampling (7 per sampled value), mask (1), sampling points (10) and bias (1 per output), and the two
    small matmuls of FastDeconv's weight fold. Elementwise work is not counted."""
    width_ = 4 * ngf
    p1, p2, p4 = height * width, height * width // 4, height * width // 16
    macs_per_image = (
        p1 * channels * channels * 9                    # FastDeconv: a 3x3 conv channels -> channels in eval
        + p1 * ngf * channels * 49                      # down1 7x7
        + p2 * 2 * ngf * ngf * 9                        # down2 3x3 stride 2
        + p4 * width_ * 2 * ngf * 9                     # down3 3x3 stride 2
        + 6 * (p4 * 2 * width_ * width_ * 9             # FA block (shared, six calls): conv1, conv2
               + p4 * (width_ * (width_ // 8) + width_ // 8)     # PA 1x1: width -> width/8 -> 1
               + 2 * width_ * (width_ // 8))            # CA 1x1 on the pooled 1x1 map: width -> width/8 -> width
        + 2 * p4 * 27 * width_ * 9                      # DCN (shared, two calls): the offset/mask conv
        + p4 * width_ * 2 * ngf * 9                     # up1: ConvTranspose, input pixels (64x64 at 256)
        + p2 * 2 * ngf * ngf * 9                        # up2: ConvTranspose, input pixels
        + p1 * channels * ngf * 49)                     # up3 7x7
    samples, points = width_ * 9 * p4, 9 * p4           # per DCN call and image
    dcn_flops_per_image = 2 * (2 * p4 * width_ * width_ * 9 + 7 * samples + samples + 10 * points + width_ * p4)
    features = 9 * channels                             # FastDeconv fold: w [C, 27] @ deconv [27, 27], w @ mean
    fold = 2 * channels * features * features + 2 * channels * features
    return batch * (2 * macs_per_image + dcn_flops_per_image) + fold, batch * dcn_flops_per_image


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = AECRNet(ngf=8)
    with torch.no_grad():  # non-zero offsets, so that the DCN samples off the grid
        model.dcn_block.dcn.conv_offset_mask.weight.normal_(0, 0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    row = profile_model(model, size=(32, 32), warmup=1, repeat=2, arch="aecr")
    return model, before, row


def test_parameters(tiny):
    model, _, row = tiny
    assert row["parameters"] == sum(p.numel() for p in model.parameters()) == 50017


def test_macs_by_hand(tiny):
    _, _, row = tiny
    flops, dcn = aecr_hand_flops(8, 32, 32)
    assert row["forward_flops"] == flops
    assert row["forward_macs"] == flops / 2
    assert sum(row["forward_flops_by_operator"].values()) == flops


def test_dcn_in_the_breakdown(tiny):
    _, _, row = tiny
    _, dcn = aecr_hand_flops(8, 32, 32)
    by_op = row["forward_flops_by_operator"]
    assert by_op["aecr_ops.deform_conv2d"] == dcn == row["dcn_flops"]
    assert set(by_op) == {"aten.convolution", "aecr_ops.deform_conv2d", "aten.mm"}
    # by module: the shared FA block's six calls and the DCN's two (with its offset conv) under one name each
    assert row["forward_flops_by_module"]["dcn_block"] == dcn + 2 * 2 * 64 * 27 * 32 * 9
    assert sum(row["forward_flops_by_module"].values()) == row["forward_flops"]


def test_latency_memory_and_training(tiny):
    model, _, row = tiny
    assert row["inference_seconds"] > 0 and len(row["inference_seconds_all"]) == 2
    assert row["train_step_seconds"] > 0 and len(row["train_step_seconds_all"]) == 2
    assert min(row["inference_seconds_all"]) <= row["inference_seconds"] <= max(row["inference_seconds_all"])
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    image = 3 * 32 * 32 * 4
    assert row["peak_memory_inference_bytes"] >= weights + 2 * image  # input, output, weights at least
    # training: weights, gradients and Adam's two moments at least, and the activations kept for the backward
    assert row["peak_memory_train_bytes"] >= 4 * sum(p.numel() * 4 for p in model.parameters())
    assert row["peak_memory_train_bytes"] > row["peak_memory_inference_bytes"]
    assert "allocator" in row["memory_method"]
    # forward + backward: at least twice the forward's work (and the backward's DCN is counted)
    assert row["train_step_flops"] > 2 * row["forward_flops"]
    assert row["device"] == "cpu" and row["device_name"] and row["threads"] == torch.get_num_threads()
    assert row["torch"] == torch.__version__ and row["size"] == [32, 32] and row["arch"] == "aecr"


def test_callers_model_untouched(tiny):
    model, before, _ = tiny
    assert model.training  # left as it was (train mode by default)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # FastDeconv's running buffers too


def test_batch_scales_the_count():
    model = AECRNet(ngf=4)
    row = profile_model(model, size=(16, 24), batch=2, warmup=0, repeat=1, train=False)
    assert row["forward_flops"] == aecr_hand_flops(4, 16, 24, batch=2)[0]
    assert row["train_step_seconds"] is None and row["peak_memory_train_bytes"] is None
    assert row["batch"] == 2


def test_format_profile(tiny):
    _, _, row = tiny
    other = dict(row, arch="mine", train_step_seconds=None, peak_memory_train_bytes=None)
    text = format_profile([row, other])
    lines = text.splitlines()
    for column in ("arch", "params (M)", "GMACs", "infer (ms)", "train step (ms)", "peak MB infer",
                   "peak MB train", "published params (M)", "published GMACs"):
        assert column in lines[0]
    aecr_line = next(line for line in lines if line.startswith("aecr "))
    assert "0.050" in aecr_line and "2.61" in aecr_line and "52.2" in aecr_line
    assert f"{row['forward_macs'] / 1e9:.2f}" in aecr_line
    mine = next(line for line in lines if line.startswith("mine "))
    assert mine.split()[-1] == "-" and "2.61" not in mine
    assert len({len(line) for line in lines[:4]}) == 1  # fixed width: header, rule and rows line up
    assert "DehazeFormer" in text and PUBLISHED_SOURCE in text
    assert PUBLISHED["aecr"] == (2.61e6, 52.2e9) and PUBLISHED["ffa"] == (4.46e6, 287.8e9)


@pytest.mark.parametrize("size", [0, -4, (32,), (32, 0), (32, 32, 3), "32x32", 32.0, (30, 32), (32, 34), True])
def test_bad_sizes(size):
    with pytest.raises(ValueError, match="`size`"):
        profile_model(AECRNet(ngf=4), size=size, warmup=0, repeat=1, train=False)


class OddOnly(nn.Module):
    """A model with a constraint of its own (no size_multiple): odd widths only."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.shape[3] % 2 == 0:
            raise ValueError("OddOnly: the width must be odd")
        return self.conv(x)


def test_models_own_error_passed_on():
    with pytest.raises(ValueError, match=r"`size` 8x8 .*OddOnly: the width must be odd"):
        profile_model(OddOnly(), size=8, warmup=0, repeat=1, train=False)
    row = profile_model(OddOnly(), size=(8, 9), warmup=0, repeat=1)
    assert row["forward_flops"] == 2 * 3 * 3 * 72 and row["arch"] is None


@pytest.mark.parametrize("name, value", [("batch", 0), ("repeat", 0), ("warmup", -1), ("batch", 1.5)])
def test_bad_counts(name, value):
    with pytest.raises(ValueError, match=f"`{name}`"):
        profile_model(OddOnly(), size=(8, 9), train=False, **{name: value})


def test_full_network_at_256():
    """The official network at 256x256: 2,614,229 parameters and 40.68 G MACs, of which the two DCN calls
    4.909 G (4.832 G dense + 0.077 G sampling, mask and bias); see the analysis in aecr_model/profile.py."""
    row = profile_model(AECRNet(), size=256, warmup=0, repeat=1, train=False, arch="aecr")
    flops, dcn = aecr_hand_flops(64, 256, 256)
    assert row["parameters"] == 2614229
    assert row["forward_flops"] == flops == 81363751352
    assert row["dcn_flops"] == dcn == 9817505792
    assert 40.68e9 < row["forward_macs"] < 40.69e9
    assert row["forward_flops_by_operator"]["aten.convolution"] == 2 * 35773120512


def test_ablations_and_unshared():
    """No DCN, no FastDeconv: neither op in the breakdown; unshared weights: same MACs, more parameters."""
    row = profile_model(AECRNet(ngf=4, dcn=False, fastdeconv=False), size=16, warmup=0, repeat=1, train=False)
    assert set(row["forward_flops_by_operator"]) == {"aten.convolution"} and row["dcn_flops"] == 0
    shared = profile_model(AECRNet(ngf=4), size=16, warmup=0, repeat=1, train=False)
    unshared = profile_model(AECRNet(ngf=4, share_weights=False), size=16, warmup=0, repeat=1, train=False)
    assert unshared["forward_flops"] == shared["forward_flops"] == aecr_hand_flops(4, 16, 16)[0]
    assert unshared["parameters"] > shared["parameters"]
