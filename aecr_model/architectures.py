"""The networks this package builds, by name: AECR-Net, its ablations and FFA-Net.

    model = build_model("ffa")                    # FFA-Net, 3 groups of 19 FA blocks
    model = build_model("aecr", ngf=32)           # options go to the network's constructor

Every model built here carries its name (`model.arch`) and its constructor arguments (`model.config`);
checkpoints record both, so a checkpoint reloads without being told what it holds.
"""
from typing import Any, Dict, Tuple

from torch import Tensor, nn

from . import ffa, network

# name -> one line on what it is
ARCHITECTURES: Dict[str, str] = {
    "aecr": "AECR-Net as released: one FA block applied 6 times, one DCN applied twice (2.61 M parameters)",
    "aecr-unshared": "AECR-Net as the paper's text reads: six FA blocks and two DCNs of their own (9.29 M)",
    "aecr-no-fastdeconv": "ablation: AECR-Net without the FastDeconv whitening of its input",
    "aecr-no-dcn": "ablation: AECR-Net without the DCN layers (FA blocks only)",
    "aecr-no-mixup": "ablation: AECR-Net with plain skip additions instead of adaptive mixup",
    "ffa": "FFA-Net (Qin et al., AAAI 2020): 3 groups of 19 FA blocks, global residual (4.46 M parameters)",
}

# name -> (class, the constructor arguments that make it this architecture)
_BUILDERS: Dict[str, Tuple[type, Dict[str, Any]]] = {
    "aecr": (network.AECRNet, {}),
    "aecr-unshared": (network.AECRNet, {"share_weights": False}),
    "aecr-no-fastdeconv": (network.AECRNet, {"fastdeconv": False}),
    "aecr-no-dcn": (network.AECRNet, {"dcn": False}),
    "aecr-no-mixup": (network.AECRNet, {"mixup": False}),
    "ffa": (ffa.FFANet, {}),
}
_AECR_DEFAULTS = {"share_weights": True, "fastdeconv": True, "dcn": True, "mixup": True}


def check_arch(arch: Any, name: str = "arch") -> str:
    if arch not in ARCHITECTURES:
        raise ValueError(f"`{name}` must be one of {', '.join(ARCHITECTURES)}; got {arch!r}")
    return arch


def build_model(arch: str = "aecr", **options: Any) -> nn.Module:
    """A new network of architecture `arch` (a key of ARCHITECTURES), its constructor given `options` over
    the architecture's own settings (an option that contradicts the name, such as
    build_model("aecr-no-dcn", dcn=True), is refused). Returns it in training mode, with `.arch` and
    `.config`."""
    cls, fixed = _BUILDERS[check_arch(arch)]
    for key, value in options.items():
        if key in fixed and value != fixed[key]:
            raise ValueError(f"build_model({arch!r}): `{key}`={value!r} contradicts the architecture "
                             f"({key}={fixed[key]!r})")
    try:
        model = cls(**{**options, **fixed})
    except TypeError as error:  # an option the constructor does not take
        raise ValueError(f"build_model({arch!r}): {error}") from None
    model.arch = arch
    return model


def arch_of(model: nn.Module) -> str:
    """The architecture name of a model (built here, or constructed directly)."""
    model = getattr(model, "module", model)  # (Distributed)DataParallel
    arch = getattr(model, "arch", None)
    if arch is not None:
        return arch
    if isinstance(model, ffa.FFANet):
        return "ffa"
    if isinstance(model, network.AECRNet):
        return aecr_arch(model.config)
    raise ValueError(f"{type(model).__name__} is not one of this package's networks ({', '.join(ARCHITECTURES)})")


def aecr_arch(config: Dict[str, Any]) -> str:
    """The name of the AECR-Net variant a config describes; "aecr" for a combination no name covers (the
    config then carries the differences)."""
    changed = {k: v for k, v in config.items() if k in _AECR_DEFAULTS and v != _AECR_DEFAULTS[k]}
    for name, (cls, fixed) in _BUILDERS.items():
        if cls is network.AECRNet and fixed == changed:
            return name
    return "aecr"


def infer_from_state_dict(state: Dict[str, Tensor]) -> Tuple[str, Dict[str, Any]]:
    """(arch, constructor arguments) of a normalised state dict; ValueError if it is none of ours."""
    if ffa.is_ffa_state_dict(state):
        return "ffa", ffa.config_from_state_dict(state)
    try:
        config = network.config_from_state_dict(state)
    except ValueError:
        raise ValueError(f"not a state dict of any of {', '.join(ARCHITECTURES)} (keys: {sorted(state)[:6]})") \
            from None
    return aecr_arch(config), config
