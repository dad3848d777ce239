"""build_model and ARCHITECTURES: every network by name, the ablations' structure and parameter counts, and
checkpoints that record their architecture."""
import pytest
import torch
import torch.nn.functional as F

import aecr_ops
from aecr_model import ARCHITECTURES, AECRNet, FFANet, arch_of, build_model, load_checkpoint, save_checkpoint
from aecr_model.checkpoint import CheckpointError, read_checkpoint
from aecr_model.network import count_parameters

TINY = {"aecr": {"ngf": 8}, "aecr-unshared": {"ngf": 8}, "aecr-no-fastdeconv": {"ngf": 8}, "aecr-no-dcn": {"ngf": 8},
        "aecr-no-mixup": {"ngf": 8}, "ffa": {"blocks": 1, "dim": 16}}


def tiny(arch, seed=0):
    torch.manual_seed(seed)
    model = build_model(arch, **TINY[arch])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model.eval()


def test_the_names_and_descriptions():
    assert set(ARCHITECTURES) == {"aecr", "aecr-unshared", "aecr-no-fastdeconv", "aecr-no-dcn", "aecr-no-mixup", "ffa"}
    assert set(TINY) == set(ARCHITECTURES)
    for name, text in ARCHITECTURES.items():
        assert isinstance(text, str) and text and "\n" not in text, name


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_builds_runs_and_names_itself(arch):
    model = tiny(arch)
    assert model.arch == arch and arch_of(model) == arch
    x = torch.rand(2, 3, 16, 20)
    out = model(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


# The official network's parameters (the spec's 2,614,229) less the parts each ablation removes, counted from
# the layer shapes: FastDeconv(3, 3, 3x3) holds a 3x3x3x3 weight and 3 biases; the DCN layer a 256x256x3x3 weight,
# 256 biases and its offset/mask conv of 27x256x3x3 weights and 27 biases; each mixup one weight.
OFFICIAL = 2_614_229
FASTDECONV = 3 * 3 * 3 * 3 + 3
DCN = 256 * 256 * 9 + 256 + 27 * 256 * 9 + 27
FA_BLOCK = 2 * (256 * 256 * 9 + 256) + (256 * 32 + 32 + 32 * 256 + 256) + (256 * 32 + 32 + 32 + 1)


@pytest.mark.parametrize("arch,expected", [
    ("aecr", OFFICIAL),
    ("aecr-unshared", OFFICIAL + 5 * FA_BLOCK + DCN),
    ("aecr-no-fastdeconv", OFFICIAL - FASTDECONV),
    ("aecr-no-dcn", OFFICIAL - DCN),
    ("aecr-no-mixup", OFFICIAL - 2),
    ("ffa", 4_455_913),
])
def test_parameter_counts(arch, expected):
    assert count_parameters(build_model(arch)) == expected


def test_the_ablations_remove_exactly_their_part():
    kinds = {arch: {type(m) for m in build_model(arch, ngf=8).modules()}
             for arch in ("aecr", "aecr-no-fastdeconv", "aecr-no-dcn", "aecr-no-mixup")}
    assert aecr_ops.FastDeconv in kinds["aecr"] and aecr_ops.FastDeconv not in kinds["aecr-no-fastdeconv"]
    assert aecr_ops.DCN in kinds["aecr"] and aecr_ops.DCN not in kinds["aecr-no-dcn"]
    mix = type(build_model("aecr", ngf=8).mix1)
    assert mix in kinds["aecr"] and mix not in kinds["aecr-no-mixup"]
    assert aecr_ops.DCN in kinds["aecr-no-fastdeconv"] and aecr_ops.FastDeconv in kinds["aecr-no-dcn"]


def manual_forward(model, x, fastdeconv=True, dcn=True, mixup=True):
    """AECR-Net's forward written out again from the spec, with the ablated parts left out."""
    h0 = model.deconv(x) if fastdeconv else x
    d1 = F.relu(F.conv2d(F.pad(h0, (3, 3, 3, 3), mode="reflect"), model.down1[1].weight, model.down1[1].bias))
    d2 = F.relu(F.conv2d(d1, model.down2[0].weight, model.down2[0].bias, stride=2, padding=1))
    d3 = F.relu(F.conv2d(d2, model.down3[0].weight, model.down3[0].bias, stride=2, padding=1))
    h = d3
    for _ in range(6):
        h = model.block(h)
    if dcn:
        for _ in range(2):
            h = model.dcn_block(h)

    def mix(layer, a, b):
        if not mixup:
            return a + b
        f = torch.sigmoid(layer.w)
        return f * a + (1 - f) * b

    u1 = F.relu(F.conv_transpose2d(mix(model.mix1, d3, h), model.up1[0].weight, model.up1[0].bias, stride=2,
                                   padding=1, output_padding=1))
    u2 = F.relu(F.conv_transpose2d(mix(model.mix2, d2, u1), model.up2[0].weight, model.up2[0].bias, stride=2,
                                   padding=1, output_padding=1))
    return torch.tanh(F.conv2d(F.pad(u2, (3, 3, 3, 3), mode="reflect"), model.up3[1].weight, model.up3[1].bias))


@pytest.mark.parametrize("arch,flags", [
    ("aecr", {}), ("aecr-no-fastdeconv", {"fastdeconv": False}), ("aecr-no-dcn", {"dcn": False}),
    ("aecr-no-mixup", {"mixup": False})])
def test_the_ablations_compute_what_they_say(arch, flags):
    model = tiny(arch).double()
    x = torch.rand(2, 3, 16, 12, dtype=torch.float64)
    torch.testing.assert_close(model(x), manual_forward(model, x, **flags), rtol=1e-10, atol=1e-10)


def test_build_model_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="`arch`.*aecr-no-dcn"):
        build_model("aecr-net")
    with pytest.raises(ValueError, match="dcn.*contradicts"):
        build_model("aecr-no-dcn", dcn=True)
    with pytest.raises(ValueError, match="width"):
        build_model("ffa", width=3)
    with pytest.raises(ValueError, match="`ngf`"):
        build_model("aecr", ngf=0)
    assert build_model("aecr-no-dcn", dcn=False, ngf=8).config["dcn"] is False


def test_models_built_directly_are_named_by_their_config():
    assert arch_of(AECRNet(ngf=8, mixup=False)) == "aecr-no-mixup"
    assert arch_of(AECRNet(ngf=8, share_weights=False)) == "aecr-unshared"
    assert arch_of(AECRNet(ngf=8, dcn=False, mixup=False)) == "aecr"  # no name: "aecr" with its config
    assert arch_of(FFANet(blocks=1, dim=16)) == "ffa"
    with pytest.raises(ValueError, match="Linear"):
        arch_of(torch.nn.Linear(2, 2))


def assert_same_network(a, b):
    assert type(a) is type(b) and a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_checkpoints_record_the_architecture_and_reload_without_being_told(tmp_path, arch):
    model = tiny(arch)
    save_checkpoint(str(tmp_path / "m.pt"), model, step=3)
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    assert ckpt["arch"] == arch and ckpt["config"] == model.config
    loaded = load_checkpoint(str(tmp_path / "m.pt"))
    assert loaded.arch == arch and not loaded.training
    assert_same_network(loaded, model)
    x = torch.rand(1, 3, 12, 16)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_plain_state_dicts_are_recognised_by_their_keys(tmp_path, arch):
    model = tiny(arch)
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "plain.pth")
    loaded = load_checkpoint(str(tmp_path / "plain.pth"))
    assert loaded.arch == arch
    assert_same_network(loaded, model)
    assert load_checkpoint(str(tmp_path / "plain.pth"), arch=arch).arch == arch


def test_a_named_architecture_that_contradicts_the_file_is_refused(tmp_path):
    save_checkpoint(str(tmp_path / "ffa.pt"), tiny("ffa"))
    with pytest.raises(CheckpointError, match="'ffa' network, not 'aecr'"):
        load_checkpoint(str(tmp_path / "ffa.pt"), arch="aecr")
    torch.save(tiny("aecr-no-dcn").state_dict(), tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="'aecr-no-dcn' network, not 'aecr'"):
        load_checkpoint(str(tmp_path / "plain.pth"), arch="aecr")
    with pytest.raises(ValueError, match="`arch`"):
        load_checkpoint(str(tmp_path / "plain.pth"), arch="nope")


def test_a_file_recording_an_unknown_architecture_is_refused(tmp_path):
    model = tiny("aecr")
    torch.save({"arch": "aecr-v9", "config": model.config, "model": model.state_dict()}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="aecr-v9"):
        read_checkpoint(str(tmp_path / "future.pt"))


def test_checkpoints_of_earlier_versions_without_the_ablation_flags_load(tmp_path):
    model = tiny("aecr")
    old_config = {k: model.config[k] for k in ("in_channels", "out_channels", "ngf", "share_weights")}
    torch.save({"format": "aecr-net-checkpoint", "version": 1, "config": old_config, "model": model.state_dict()},
               tmp_path / "old.pt")
    assert_same_network(load_checkpoint(str(tmp_path / "old.pt")), model)
