"""load_checkpoint reads AECR-Net files whose DCN layers were mmcv's ModulatedDeformConv2dPack (`dcn.conv_offset`
keys, or mmcv's version-1 `dcn_offset` keys) instead of CharlesShang/DCNv2's DCN (`dcn.conv_offset_mask`)."""
import pytest
import torch

import aecr_ops
from aecr_model import load_checkpoint
from aecr_model.checkpoint import CheckpointError, normalise_state_dict

import test_model_checkpoint


def random_model(**kwargs):
    return test_model_checkpoint.random_model(**kwargs).eval()


def mmcv_flavoured(model):
    """The same network with each DCN layer replaced by mmcv's layer (aecr_ops.ModulatedDeformConv2dPack), its
    weights copied over: what an AECR-Net built on `from mmcv.ops import ModulatedDeformConv2dPack as DCN`
    holds."""
    blocks = [model.dcn_block] if model.share_weights else list(model.dcn_blocks)
    for block in blocks:
        dcn = block.dcn
        pack = aecr_ops.ModulatedDeformConv2dPack(dcn.in_channels, dcn.out_channels, dcn.kernel_size, dcn.stride,
                                                  dcn.padding, dcn.dilation, deform_groups=dcn.deformable_groups)
        state = {k.replace("conv_offset_mask.", "conv_offset."): v for k, v in dcn.state_dict().items()}
        pack.load_state_dict(state, strict=True)
        block.dcn = pack
    return model


@pytest.mark.parametrize("share_weights", [True, False])
@pytest.mark.parametrize("wrapped", [True, False])
def test_checkpoint_of_an_aecrnet_on_mmcvs_dcn(tmp_path, share_weights, wrapped):
    ours = random_model(ngf=16, share_weights=share_weights)
    x = torch.rand(1, 3, 16, 20)
    with torch.no_grad():
        expected = ours(x)
    theirs = mmcv_flavoured(random_model(ngf=16, share_weights=share_weights))
    state = theirs.state_dict()
    assert any(k.endswith("dcn.conv_offset.weight") for k in state)
    assert not any("conv_offset_mask" in k for k in state)
    with torch.no_grad():
        assert torch.equal(theirs(x), expected)       # the mmcv layers compute what the DCN layers did
    state = {"module." + k: v for k, v in state.items()}
    path = tmp_path / "mmcv_dcn.pk"
    torch.save({"model": state, "step": 10} if wrapped else state, path)
    loaded = load_checkpoint(str(path))
    assert loaded.config["share_weights"] == share_weights
    for k, v in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_renamed_keys_of_the_official_network(tmp_path):
    model = random_model()
    renamed = {}
    for key, value in model.state_dict().items():
        key = key.replace("dcn.conv_offset_mask.", "dcn.conv_offset.")
        renamed["module." + key.replace("mix1.", "mix4.").replace("mix2.", "mix5.")] = value
    assert "module.dcn_block.dcn.conv_offset.weight" in renamed
    torch.save({"model": renamed}, tmp_path / "its_mmcv.pk")
    loaded = load_checkpoint(str(tmp_path / "its_mmcv.pk"))
    x = torch.rand(2, 3, 12, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_mmcv_version_1_keys(tmp_path):
    model = random_model(ngf=16, share_weights=False)
    old = {k.replace(".dcn.conv_offset_mask.", ".dcn_offset."): v for k, v in model.state_dict().items()}
    assert "dcn_blocks.1.dcn_offset.bias" in old
    torch.save(old, tmp_path / "v1.pth")
    loaded = load_checkpoint(str(tmp_path / "v1.pth"))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_both_names_of_one_layer_are_reported(tmp_path):
    state = random_model(ngf=16).state_dict()
    state["dcn_block.dcn.conv_offset.weight"] = state["dcn_block.dcn.conv_offset_mask.weight"].clone()
    torch.save(state, tmp_path / "both.pth")
    with pytest.raises(CheckpointError, match="dcn_block.dcn.conv_offset.weight"):
        load_checkpoint(str(tmp_path / "both.pth"))


def test_normalise_leaves_other_keys_alone():
    t = torch.zeros(1)
    state = {"module.conv_offset.weight": t, "block.conv1.weight": t, "dcn_block.dcn.weight": t,
             "dcn_block.dcn.conv_offset_mask.bias": t, "dcn_block.dcn.conv_offset.weightx": t}
    assert set(normalise_state_dict(state)) == {"conv_offset.weight", "block.conv1.weight", "dcn_block.dcn.weight",
                                                "dcn_block.dcn.conv_offset_mask.bias",
                                                "dcn_block.dcn.conv_offset.weightx"}
