"""FFANet: the official structure (zhilin007/FFA-Net, net/models/FFA.py), state dict, parameter count and forward;
and, in the last section, loading the official release format through aecr_model.load_checkpoint."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aecr_model.ffa import FFANet, config_from_state_dict, is_ffa_state_dict
from aecr_model.network import AECRNet


@pytest.fixture(scope="module")
def official():
    torch.manual_seed(0)
    return FFANet().eval()


def official_shapes(groups=3, blocks=19, dim=64):
    """The state dict of FFA(gps, blocks) as the official code lays it out: key -> shape."""
    out = {}

    def conv(name, c_out, c_in, k):
        out[f"{name}.weight"] = (c_out, c_in, k, k)
        out[f"{name}.bias"] = (c_out,)

    conv("pre.0", dim, 3, 3)
    for g in range(1, groups + 1):
        for b in range(blocks):
            p = f"g{g}.gp.{b}"
            conv(f"{p}.conv1", dim, dim, 3)
            conv(f"{p}.conv2", dim, dim, 3)
            conv(f"{p}.calayer.ca.0", dim // 8, dim, 1)
            conv(f"{p}.calayer.ca.2", dim, dim // 8, 1)
            conv(f"{p}.palayer.pa.0", dim // 8, dim, 1)
            conv(f"{p}.palayer.pa.2", 1, dim // 8, 1)
        conv(f"g{g}.gp.{blocks}", dim, dim, 3)
    conv("ca.1", dim // 16, dim * groups, 1)
    conv("ca.3", dim * groups, dim // 16, 1)
    conv("palayer.pa.0", dim // 8, dim, 1)
    conv("palayer.pa.2", 1, dim // 8, 1)
    conv("post.0", dim, dim, 3)
    conv("post.1", 3, dim, 3)
    return out


def test_state_dict_keys_and_shapes_are_the_official_ones(official):
    shapes = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    assert shapes == official_shapes()
    assert len(shapes) == 3 * (19 * 12 + 2) + 4 + 4 + 2 + 4  # 704


def test_parameter_count_is_the_official_one(official):
    def conv(c_in, c_out, k):
        return c_out * c_in * k * k + c_out

    ca = conv(64, 8, 1) + conv(8, 64, 1)  # 520 + 576
    pa = conv(64, 8, 1) + conv(8, 1, 1)  # 520 + 9
    block = 2 * conv(64, 64, 3) + ca + pa  # 2 * 36928 + 1096 + 529
    group = 19 * block + conv(64, 64, 3)
    fusion = conv(192, 4, 1) + conv(4, 192, 1)  # 772 + 960
    expected = 3 * group + fusion + pa + conv(3, 64, 3) + conv(64, 64, 3) + conv(64, 3, 3)
    assert (ca, pa, block, group, fusion) == (1096, 529, 75481, 1471067, 1732)
    assert expected == 4_455_913
    assert sum(p.numel() for p in official.parameters()) == expected


def test_forward_any_size_and_unclamped(official):
    x = torch.rand(1, 3, 13, 17)
    with torch.no_grad():
        y = official(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()


def test_global_residual():
    torch.manual_seed(1)
    raw = FFANet(groups=2, blocks=1, dim=16, normalize_input=False)
    official = FFANet(groups=2, blocks=1, dim=16)
    for model in (raw, official):
        with torch.no_grad():
            model.post[1].weight.zero_()
            model.post[1].bias.zero_()
    x = torch.randn(2, 3, 7, 5) * 3  # outside [0, 1]: nothing clamps
    with torch.no_grad():
        assert torch.equal(raw(x), x)
        # The official pipeline adds the normalised input back (net/data_utils.py's Normalize).
        mean = torch.tensor([0.64, 0.6, 0.58]).view(1, 3, 1, 1)
        std = torch.tensor([0.14, 0.15, 0.152]).view(1, 3, 1, 1)
        torch.testing.assert_close(official(x), (x - mean) / std, rtol=0, atol=1e-6)


def test_the_normalisation_is_no_part_of_the_state_dict():
    model = FFANet(groups=3, blocks=1, dim=16)
    assert not any("input_" in key for key in model.state_dict())
    assert FFANet(groups=3, blocks=1, dim=16, normalize_input=False).state_dict().keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match="`normalize_input`"):
        FFANet(normalize_input=1)


# -- an independent float64 reference, straight from the state dict ------------------------------------------

def _conv(x, s, name):
    weight = s[f"{name}.weight"]
    return F.conv2d(x, weight, s[f"{name}.bias"], padding=weight.shape[-1] // 2)


def _pixel_attention(x, s, p):
    return x * torch.sigmoid(_conv(torch.relu(_conv(x, s, f"{p}.pa.0")), s, f"{p}.pa.2"))


def _channel_attention(x, s, p):
    y = x.mean(dim=(2, 3), keepdim=True)
    return x * torch.sigmoid(_conv(torch.relu(_conv(y, s, f"{p}.ca.0")), s, f"{p}.ca.2"))


def _block(x, s, p):
    r = torch.relu(_conv(x, s, f"{p}.conv1")) + x
    r = _conv(r, s, f"{p}.conv2")
    r = _channel_attention(r, s, f"{p}.calayer")
    r = _pixel_attention(r, s, f"{p}.palayer")
    return r + x


def reference_ffa(x, s, groups, blocks, dim, normalize=True):
    if normalize:  # the official data loader's transforms.Normalize
        x = (x - torch.tensor([0.64, 0.6, 0.58], dtype=x.dtype).view(1, 3, 1, 1)) / torch.tensor(
            [0.14, 0.15, 0.152], dtype=x.dtype).view(1, 3, 1, 1)
    h = _conv(x, s, "pre.0")
    outputs = []
    for g in range(1, groups + 1):
        r = h
        for b in range(blocks):
            r = _block(r, s, f"g{g}.gp.{b}")
        h = _conv(r, s, f"g{g}.gp.{blocks}") + h
        outputs.append(h)
    pooled = torch.cat(outputs, dim=1).mean(dim=(2, 3), keepdim=True)
    w = torch.sigmoid(_conv(torch.relu(_conv(pooled, s, "ca.1")), s, "ca.3"))  # [B, groups * dim, 1, 1]
    fused = sum(w[:, g * dim:(g + 1) * dim] * outputs[g] for g in range(groups))
    fused = _pixel_attention(fused, s, "palayer")
    return _conv(_conv(fused, s, "post.0"), s, "post.1") + x


@pytest.mark.parametrize("groups,blocks,dim,normalize", [(3, 1, 16, True), (2, 2, 16, False)])
def test_forward_matches_a_reference_in_float64(groups, blocks, dim, normalize):
    torch.manual_seed(2)
    model = FFANet(groups=groups, blocks=blocks, dim=dim, normalize_input=normalize).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the default init, so every path weighs in
            p.copy_(torch.randn_like(p) * 0.3)
        x = torch.rand(2, 3, 9, 11, dtype=torch.float64)
        x[1] = x[1] * 2 - 0.5  # the two images differ: the per-image fusion weights must not mix
        state = {k: v.clone() for k, v in model.state_dict().items()}
        expected = reference_ffa(x, state, groups, blocks, dim, normalize)
        got = model(x)
    assert (expected - x).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


# -- configs from state dicts ------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [dict(groups=3, blocks=1, dim=16), dict(groups=1, blocks=1, dim=16),
                                    dict(groups=4, blocks=2, dim=32), dict(groups=2, blocks=3, dim=16)])
def test_config_from_state_dict_round_trip(config):
    model = FFANet(**config)
    state = model.state_dict()
    assert is_ffa_state_dict(state)
    found = config_from_state_dict(state)
    assert found == {**config, "normalize_input": True} == model.config
    assert all(type(found[k]) is int for k in config)
    assert {k: tuple(v.shape) for k, v in state.items()} == official_shapes(**config)


def test_config_of_the_official_network(official):
    assert config_from_state_dict(official.state_dict()) == dict(groups=3, blocks=19, dim=64,
                                                                 normalize_input=True) == official.config


def test_config_from_state_dict_refuses_other_dicts():
    aecr = AECRNet(ngf=8).state_dict()
    assert not is_ffa_state_dict(aecr)
    for state in (aecr, {}, {"pre.0.weight": torch.zeros(16, 3, 3, 3)}):
        with pytest.raises(ValueError, match="not an FFA-Net state dict"):
            config_from_state_dict(state)
    ffa = FFANet(groups=2, blocks=2, dim=16).state_dict()
    broken = [{k: v for k, v in ffa.items() if not k.startswith("g2.gp.2.")},  # g2 without its conv
              {k: v for k, v in ffa.items() if not k.startswith("g2.gp.1.")},  # g2 with a block missing
              {(k.replace("g2.", "g3.", 1) if k.startswith("g2.") else k): v for k, v in ffa.items()}]  # g1, g3
    for state in broken:
        with pytest.raises(ValueError, match="not an FFA-Net state dict"):
            config_from_state_dict(state)


# -- errors ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["groups", "blocks", "dim"])
@pytest.mark.parametrize("value", [0, -16, 16.0, True, "16", None])
def test_constructor_errors_name_the_argument(name, value):
    with pytest.raises(ValueError, match=f"`{name}` must be a positive int"):
        FFANet(**{"groups": 1, "blocks": 1, "dim": 16, name: value})


@pytest.mark.parametrize("dim", [8, 24, 40])
def test_dim_must_be_a_multiple_of_16(dim):
    with pytest.raises(ValueError, match="`dim` must be a multiple of 16"):
        FFANet(groups=1, blocks=1, dim=dim)


@pytest.mark.parametrize("x,shape", [(torch.zeros(1, 4, 8, 8), r"\[1, 4, 8, 8\]"), (torch.zeros(3, 8, 8),
                                     r"\[3, 8, 8\]"), (np.zeros((1, 3, 8, 8)), "ndarray")])
def test_input_errors(x, shape):
    model = FFANet(groups=1, blocks=1, dim=16)
    with pytest.raises(ValueError, match=rf"input must be \[B, 3, H, W\], got {shape}"):
        model(x)


# == The loading contract (made to pass by aecr_model's registry and checkpoint code, not by ffa.py) ==========
#
# The official training script (net/main.py) saves, on a new best evaluation:
#     torch.save({'step': step, 'max_psnr': max_psnr, 'max_ssim': max_ssim, 'ssims': ssims, 'psnrs': psnrs,
#                 'losses': losses, 'model': net.state_dict()}, opt.model_dir)
# with net an nn.DataParallel (keys "module.*"); step is an int, max_psnr / max_ssim numpy.float64 (np.mean of
# the test set's scores), ssims / psnrs lists of numpy.float64, losses a list of float (loss.item()). The release
# predates torch 1.6, so the file may be in torch's legacy (non-zip) format.

def official_release(path, model, legacy_format=False):
    scores = [np.float64(0.9123), np.float64(0.9456)]
    psnrs = [np.float64(28.5), np.float64(30.1)]
    record = {"step": 1000, "max_psnr": np.float64(30.1), "max_ssim": np.float64(0.9456), "ssims": scores,
              "psnrs": psnrs, "losses": [0.05, 0.04, 0.031], "model": nn.DataParallel(model).state_dict()}
    assert all(k.startswith("module.") for k in record["model"])
    torch.save(record, path, _use_new_zipfile_serialization=not legacy_format)


def assert_loads_as(path, model, x):
    from aecr_model import load_checkpoint
    loaded = load_checkpoint(str(path))
    assert isinstance(loaded, FFANet) and not loaded.training
    assert loaded.config == model.config
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


@pytest.mark.parametrize("legacy_format", [False, True])
def test_official_release_format_loads(tmp_path, legacy_format):
    torch.manual_seed(3)
    model = FFANet(groups=3, blocks=1, dim=16)
    official_release(tmp_path / "its_train_ffa_3_1.pk", model, legacy_format)
    assert_loads_as(tmp_path / "its_train_ffa_3_1.pk", model, torch.rand(1, 3, 10, 7))


def test_official_release_of_the_full_network_loads(tmp_path, official):
    official_release(tmp_path / "its_train_ffa_3_19.pk", official)
    assert_loads_as(tmp_path / "its_train_ffa_3_19.pk", official, torch.rand(1, 3, 6, 5))
