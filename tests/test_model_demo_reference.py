"""The demo's shipped reference network: present, small, loadable, and what its log says it is."""
import os

import torch

from aecr_model import load_checkpoint
from aecr_model.demo import REFERENCE


def test_the_reference_loads_as_the_official_network_in_float32():
    assert os.path.getsize(REFERENCE) <= 10 * 2 ** 20
    raw = torch.load(REFERENCE, map_location="cpu", weights_only=True)
    assert raw["arch"] == "aecr" and raw["step"] == 6000 and raw["weights_dtype"] == "float16"
    assert "optimizer" not in raw
    model = load_checkpoint(REFERENCE)
    assert model.arch == "aecr" and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value, raw["model"][key].float()), key
    out = model(torch.rand(1, 3, 32, 32))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_its_training_log_records_both_phases():
    log = open(os.path.splitext(REFERENCE)[0] + ".log").read()
    assert "step 4000/4000" in log and "resumed from" in log and "step 6000/6000" in log
