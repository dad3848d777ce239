"""Paired hazy/clear image sets in the layouts found in the wild, and the training batches drawn from them.

Layouts (found automatically from the folder):
- RESIDE ITS/OTS/SOTS: ``hazy/<id>_<...>.<ext>`` pairs with ``clear/<id>.<ext>`` (any image extension; the
  clear folder may also be called ``gt`` or ``GT``). ITS names are ``<id>_<k>_<beta>``, OTS ``<id>_<A>_<beta>``.
- NH-HAZE, Dense-Haze: one folder of ``<n>_hazy.<ext>`` and ``<n>_GT.<ext>``.
- The official AECR-Net loaders' numbered ``.h5`` files holding ``haze`` and ``gt`` arrays (H x W x 3); reading
  them needs h5py (``pip install h5py``).

When a clear image is larger than its hazy one (SOTS indoor: 640x480 against 620x460), it is centre-cropped to
the hazy image's size, as the official code does. Pairing problems and unreadable files raise DataError naming
the file.
"""
import glob
import os
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
CLEAR_FOLDERS = ("clear", "gt", "GT")


class DataError(ValueError):
    """A data folder or file that cannot be used, with the reason."""


def load_image(path: str) -> Tensor:
    """An RGB image file as a float32 tensor [3, H, W] in [0, 1]."""
    from PIL import Image
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"image not found: {path}") from None
    except Exception as error:  # noqa: BLE001 - PIL raises many types for broken files
        raise DataError(f"cannot read image {path}: {error}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


def save_image(image: Tensor, path: str) -> None:
    """Writes [3, H, W] (or [1, 3, H, W]) in [0, 1] as an 8-bit image (PNG unless the name says otherwise)."""
    from PIL import Image
    if image.dim() == 4:
        image = image[0]
    array = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, ".tmp-" + os.path.basename(path))
    Image.fromarray(array).save(tmp, format=_format_of(path))
    os.replace(tmp, path)


def _format_of(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
            ".webp": "WEBP"}.get(ext, "PNG")


def _images_in(folder: str) -> List[str]:
    return sorted(p for p in glob.glob(os.path.join(folder, "*"))
                  if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS and os.path.isfile(p))


def _reside_pairs(root: str, clear_dir: str) -> List[Tuple[str, str]]:
    hazy = _images_in(os.path.join(root, "hazy"))
    if not hazy:
        raise DataError(f"{os.path.join(root, 'hazy')} holds no images")
    clear_by_id = {}
    for path in _images_in(clear_dir):
        clear_by_id.setdefault(os.path.splitext(os.path.basename(path))[0], path)
    pairs, orphans = [], []
    for path in hazy:
        image_id = os.path.splitext(os.path.basename(path))[0].split("_")[0]
        if image_id in clear_by_id:
            pairs.append((path, clear_by_id[image_id]))
        else:
            orphans.append(path)
    if orphans:
        shown = ", ".join(os.path.basename(p) for p in orphans[:5])
        raise DataError(f"{len(orphans)} hazy image(s) in {root} have no clear image: {shown}"
                        f"{' ...' if len(orphans) > 5 else ''} (hazy/<id>_<...>.<ext> pairs with "
                        f"{os.path.basename(clear_dir)}/<id>.<ext>)")
    return pairs


def _suffix_pairs(root: str) -> List[Tuple[str, str]]:
    files = _images_in(root)
    gts = {}
    for path in files:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem.endswith("_GT"):
            gts[stem[:-3]] = path
    pairs, orphans = [], []
    for path in files:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem.endswith("_hazy"):
            key = stem[:-5]
            (pairs.append((path, gts[key])) if key in gts else orphans.append(path))
    if orphans:
        shown = ", ".join(os.path.basename(p) for p in orphans[:5])
        raise DataError(f"{len(orphans)} hazy image(s) in {root} have no <n>_GT image: {shown}")
    return pairs


def find_pairs(root: str) -> List[Tuple[str, Optional[str]]]:
    """(hazy path, clear path) of every pair under `root`; for .h5 files (path, None)."""
    if not os.path.isdir(root):
        raise DataError(f"data folder not found: {root}")
    if os.path.isdir(os.path.join(root, "hazy")):
        for name in CLEAR_FOLDERS:
            if os.path.isdir(os.path.join(root, name)):
                return _reside_pairs(root, os.path.join(root, name))
        raise DataError(f"{root} has a hazy/ folder but no clear/ (or gt/, GT/) folder beside it")
    pairs = _suffix_pairs(root)
    if pairs:
        return pairs
    h5 = sorted(glob.glob(os.path.join(root, "*.h5")),
                key=lambda p: (len(os.path.basename(p)), os.path.basename(p)))
    if h5:
        return [(p, None) for p in h5]
    raise DataError(f"no hazy/clear pairs found in {root}: expected hazy/ and clear/ folders (RESIDE), files "
                    f"named <n>_hazy.<ext> and <n>_GT.<ext> (NH-HAZE, Dense-Haze), or numbered .h5 files")


def _read_h5(path: str) -> Tuple[Tensor, Tensor]:
    try:
        import h5py
    except ImportError:
        raise DataError(f"reading {path} needs h5py: pip install h5py (or pip install 'aecr[h5]')") from None
    try:
        with h5py.File(path, "r") as f:
            hazy, clear = np.asarray(f["haze"]), np.asarray(f["gt"])
    except Exception as error:  # noqa: BLE001
        raise DataError(f"cannot read {path} (an .h5 file with 'haze' and 'gt' arrays): {error}") from None

    def to_tensor(a: np.ndarray) -> Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float()
        return t / 255 if a.dtype == np.uint8 or t.max() > 1.5 else t

    return to_tensor(hazy), to_tensor(clear)


def centre_crop_to(clear: Tensor, size: Tuple[int, int], names: Tuple[str, str]) -> Tensor:
    """Crops `clear` [3, H, W] to `size` around its centre (torchvision's CenterCrop rounding)."""
    h, w = clear.shape[-2:]
    th, tw = size
    if (h, w) == (th, tw):
        return clear
    if h < th or w < tw:
        raise DataError(f"clear image {names[1]} ({w}x{h}) is smaller than its hazy image {names[0]} ({tw}x{th})")
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return clear[:, top:top + th, left:left + tw]


class PairedImages(torch.utils.data.Dataset):
    """The (hazy, clear) pairs of a folder: item i is (hazy [3, H, W], clear [3, H, W], name)."""

    def __init__(self, root: str, cache: bool = False):
        self.root = root
        self.pairs = find_pairs(root)
        self.cache = {} if cache else None

    def __len__(self) -> int:
        return len(self.pairs)

    def name(self, index: int) -> str:
        return os.path.splitext(os.path.basename(self.pairs[index][0]))[0]

    def __getitem__(self, index: int) -> Tuple[Tensor, Tensor, str]:
        if self.cache is not None and index in self.cache:
            hazy, clear = self.cache[index]
            return hazy.float().div(255), clear.float().div(255), self.name(index)
        hazy_path, clear_path = self.pairs[index]
        if clear_path is None:
            hazy, clear = _read_h5(hazy_path)
            clear_name = hazy_path
        else:
            hazy, clear = load_image(hazy_path), load_image(clear_path)
            clear_name = clear_path
        clear = centre_crop_to(clear, tuple(hazy.shape[-2:]), (hazy_path, clear_name))
        if self.cache is not None:
            self.cache[index] = ((hazy * 255).round().byte(), (clear * 255).round().byte())
        return hazy, clear, self.name(index)


def augment_pair(hazy: Tensor, clear: Tensor, flip: bool, quarter_turns: int) -> Tuple[Tensor, Tensor]:
    """The same horizontal flip and rotation by a multiple of 90 degrees for both images."""
    if flip:
        hazy, clear = hazy.flip(-1), clear.flip(-1)
    if quarter_turns:
        hazy, clear = torch.rot90(hazy, quarter_turns, (-2, -1)), torch.rot90(clear, quarter_turns, (-2, -1))
    return hazy, clear


class TrainBatches(torch.utils.data.Dataset):
    """Item `step` is the training batch of that step: (hazy [B, 3, c, c], clear [B, 3, c, c]).

    A batch is a pure function of (seed, step): random images (with replacement), random crops of size `crop`,
    random flips and quarter turns, drawn from a generator seeded by both. So a run resumed at any step sees the
    same batches as an uninterrupted one, with any number of loader workers.
    """

    def __init__(self, images: PairedImages, batch_size: int, crop: int, seed: int, augment: bool = True):
        if batch_size < 1 or crop < 4:
            raise ValueError(f"TrainBatches: batch_size >= 1 and crop >= 4 needed, got {batch_size}, {crop}")
        self.images, self.batch_size, self.crop, self.seed, self.augment = images, batch_size, crop, seed, augment

    def __len__(self) -> int:
        return 2 ** 31 - 1

    def generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) % (2 ** 63))

    def __getitem__(self, step: int) -> Tuple[Tensor, Tensor]:
        g = self.generator(step)
        picks = torch.randint(len(self.images), (self.batch_size,), generator=g).tolist()
        hazies, clears = [], []
        for index in picks:
            hazy, clear, name = self.images[index]
            h, w = hazy.shape[-2:]
            if h < self.crop or w < self.crop:
                raise DataError(f"image {name} of {self.images.root} ({w}x{h}) is smaller than the crop size "
                                f"{self.crop}")
            top = int(torch.randint(h - self.crop + 1, (1,), generator=g))
            left = int(torch.randint(w - self.crop + 1, (1,), generator=g))
            flip = bool(torch.randint(2, (1,), generator=g))
            turns = int(torch.randint(4, (1,), generator=g))
            hazy = hazy[:, top:top + self.crop, left:left + self.crop]
            clear = clear[:, top:top + self.crop, left:left + self.crop]
            if self.augment:
                hazy, clear = augment_pair(hazy, clear, flip, turns)
            hazies.append(hazy)
            clears.append(clear)
        return torch.stack(hazies), torch.stack(clears)
