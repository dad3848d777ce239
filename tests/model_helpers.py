"""Small data sets for the aecr_model tests."""
import os

import torch

from aecr_model.data import save_image
from aecr_model.synthetic import make_synthetic_dataset


def tiny_reside(root, scenes=4, size=(36, 44), hazes=2, seed=0, first_id=1):
    return make_synthetic_dataset(str(root), scenes, size, hazes_per_scene=hazes, seed=seed, first_id=first_id)


def write_pair_files(folder, names, size=(20, 24), seed=0):
    g = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    for name in names:
        save_image(torch.rand(3, *size, generator=g), os.path.join(folder, name))
