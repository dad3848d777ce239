"""aecr_model: AECR-Net (Wu et al., CVPR 2021) on the aecr_ops operators: network, contrastive regularisation,
data, training, evaluation, inference and the `aecr-net` command line."""
from .checkpoint import load_checkpoint, save_checkpoint
from .dcp import dehaze_dcp
from .inference import dehaze_files, dehaze_tensor
from .losses import ContrastiveRegularization
from .metrics import psnr, ssim
from .network import AECRNet
from .tiled import dehaze_tiled

__all__ = ["AECRNet", "load_checkpoint", "save_checkpoint", "ContrastiveRegularization", "dehaze_dcp",
           "dehaze_tensor", "dehaze_tiled", "dehaze_files", "psnr", "ssim"]
