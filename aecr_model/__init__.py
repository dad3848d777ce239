"""aecr_model: AECR-Net (Wu et al., CVPR 2021) on the aecr_ops operators, FFA-Net and the paper's ablations
(`build_model`, `ARCHITECTURES`): networks, contrastive regularisation, data, training, evaluation, inference,
profiling and the `aecr-net` command line."""
from .architectures import ARCHITECTURES, arch_of, build_model
from .checkpoint import load_checkpoint, save_checkpoint
from .dcp import dehaze_dcp
from .inference import dehaze_files, dehaze_tensor
from .losses import ContrastiveRegularization
from .metrics import psnr, ssim
from .ffa import FFANet
from .network import AECRNet
from .tiled import dehaze_tiled

__all__ = ["ARCHITECTURES", "build_model", "arch_of", "AECRNet", "FFANet", "load_checkpoint", "save_checkpoint", "ContrastiveRegularization", "dehaze_dcp",
           "dehaze_tensor", "dehaze_tiled", "dehaze_files", "psnr", "ssim"]
