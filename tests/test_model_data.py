"""Data: the layouts and their pairing rules, errors that name files, SOTS cropping, batches, synthetic haze."""
import os

import pytest
import torch

from aecr_model.data import DataError, PairedImages, TrainBatches, find_pairs, load_image, save_image
from aecr_model.synthetic import add_haze, make_pair, make_scene
from model_helpers import tiny_reside, write_pair_files


def names(pairs):
    return [(os.path.basename(h), os.path.basename(c) if c else None) for h, c in pairs]


def test_reside_its_naming(tmp_path):
    write_pair_files(tmp_path / "hazy", ["1_1_0.90.png", "1_2_0.76.png", "22_10_0.6.png"])
    write_pair_files(tmp_path / "clear", ["1.png", "22.png"])
    assert names(find_pairs(str(tmp_path))) == [("1_1_0.90.png", "1.png"), ("1_2_0.76.png", "1.png"),
                                                ("22_10_0.6.png", "22.png")]


def test_reside_ots_naming_with_jpg_and_gt_folder(tmp_path):
    write_pair_files(tmp_path / "hazy", ["0005_0.8_0.2.jpg", "0006_1_0.08.jpg"])
    write_pair_files(tmp_path / "GT", ["0005.jpg", "0006.png"])
    assert names(find_pairs(str(tmp_path))) == [("0005_0.8_0.2.jpg", "0005.jpg"), ("0006_1_0.08.jpg", "0006.png")]


def test_nh_haze_and_dense_haze_naming(tmp_path):
    write_pair_files(tmp_path, ["01_hazy.png", "01_GT.png", "02_hazy.png", "02_GT.png"])
    assert names(find_pairs(str(tmp_path))) == [("01_hazy.png", "01_GT.png"), ("02_hazy.png", "02_GT.png")]


def test_pairing_errors_name_the_files(tmp_path):
    write_pair_files(tmp_path / "a" / "hazy", ["1_1_0.9.png", "7_1_0.9.png"])
    write_pair_files(tmp_path / "a" / "clear", ["1.png"])
    with pytest.raises(DataError, match="7_1_0.9.png"):
        find_pairs(str(tmp_path / "a"))
    write_pair_files(tmp_path / "b", ["03_hazy.png"])
    with pytest.raises(DataError, match="03_hazy.png"):
        find_pairs(str(tmp_path / "b"))
    write_pair_files(tmp_path / "c" / "hazy", ["1_1.png"])
    with pytest.raises(DataError, match="no clear/"):
        find_pairs(str(tmp_path / "c"))
    os.makedirs(tmp_path / "d")
    with pytest.raises(DataError, match="no hazy/clear pairs"):
        find_pairs(str(tmp_path / "d"))
    with pytest.raises(DataError, match="not found"):
        find_pairs(str(tmp_path / "missing"))


def test_unreadable_image_is_named(tmp_path):
    write_pair_files(tmp_path / "clear", ["1.png"])
    os.makedirs(tmp_path / "hazy")
    (tmp_path / "hazy" / "1_1_0.9.png").write_bytes(b"\x89PNG broken")
    images = PairedImages(str(tmp_path))
    with pytest.raises(DataError, match="1_1_0.9.png"):
        images[0]


def test_sots_clear_image_is_centre_cropped(tmp_path):
    g = torch.Generator().manual_seed(0)
    clear = torch.rand(3, 30, 40, generator=g)
    save_image(clear, str(tmp_path / "clear" / "1.png"))
    save_image(torch.rand(3, 24, 30, generator=g), str(tmp_path / "hazy" / "1_1_0.9.png"))
    hazy_t, clear_t, name = PairedImages(str(tmp_path))[0]
    assert hazy_t.shape == clear_t.shape == (3, 24, 30) and name == "1_1_0.9"
    torch.testing.assert_close(clear_t, load_image(str(tmp_path / "clear" / "1.png"))[:, 3:27, 5:35])


def test_clear_smaller_than_hazy_is_an_error(tmp_path):
    write_pair_files(tmp_path / "clear", ["1.png"], size=(10, 10))
    write_pair_files(tmp_path / "hazy", ["1_1_0.9.png"], size=(12, 12))
    with pytest.raises(DataError, match="smaller"):
        PairedImages(str(tmp_path))[0]


def test_h5_files(tmp_path):
    h5py = pytest.importorskip("h5py")
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        hazy = (torch.rand(20, 24, 3, generator=g) * 255).byte().numpy()
        gt = (torch.rand(22, 26, 3, generator=g) * 255).byte().numpy()
        with h5py.File(tmp_path / f"{i}.h5", "w") as f:
            f["haze"], f["gt"] = hazy, gt
    images = PairedImages(str(tmp_path))
    hazy, clear, _ = images[1]
    assert hazy.shape == clear.shape == (3, 20, 24)
    assert torch.equal(hazy, torch.from_numpy(f_array(tmp_path / "1.h5", "haze")).permute(2, 0, 1).float() / 255)


def f_array(path, key):
    import h5py
    with h5py.File(path, "r") as f:
        return f[key][()]


def test_batches_are_a_function_of_seed_and_step(tmp_path):
    images = PairedImages(tiny_reside(tmp_path))
    a = TrainBatches(images, 3, 16, seed=5)
    b = TrainBatches(images, 3, 16, seed=5)
    for step in (1, 2, 17):
        ha, ca = a[step]
        hb, cb = b[step]
        assert torch.equal(ha, hb) and torch.equal(ca, cb) and ha.shape == (3, 3, 16, 16)
    assert not torch.equal(a[1][0], a[2][0])
    assert not torch.equal(a[1][0], TrainBatches(images, 3, 16, seed=6)[1][0])


def test_augmentation_moves_hazy_and_clear_together(tmp_path):
    # clear = 1 - hazy pixel by pixel, so any transform applied to both keeps the relation.
    g = torch.Generator().manual_seed(0)
    for i in range(1, 4):
        hazy = torch.rand(3, 20, 26, generator=g)
        save_image(hazy, str(tmp_path / "hazy" / f"{i}_1_1.0.png"))
        save_image(1 - load_image_roundtrip(hazy), str(tmp_path / "clear" / f"{i}.png"))
    batches = TrainBatches(PairedImages(str(tmp_path)), 8, 12, seed=1)
    for step in range(1, 6):
        hazy, clear = batches[step]
        torch.testing.assert_close(clear, 1 - hazy, atol=1 / 255 + 1e-6, rtol=0)


def load_image_roundtrip(x):
    return (x * 255).round() / 255


def test_crop_larger_than_image_is_an_error(tmp_path):
    images = PairedImages(tiny_reside(tmp_path, size=(20, 20)))
    with pytest.raises(DataError, match="smaller than the crop"):
        TrainBatches(images, 2, 24, seed=0)[1]


def test_atmospheric_scattering_model():
    clear = torch.rand(3, 8, 8)
    depth = torch.rand(8, 8)
    hazy = add_haze(clear, depth, beta=1.3, airlight=0.8)
    t = torch.exp(-1.3 * depth)
    torch.testing.assert_close(hazy, clear * t + 0.8 * (1 - t))
    assert torch.equal(add_haze(clear, torch.zeros(8, 8), 2.0, 0.9), clear)  # no distance, no haze


def test_synthetic_scenes_and_set(tmp_path):
    clear, depth = make_scene((40, 60), torch.Generator().manual_seed(0))
    assert clear.shape == (3, 40, 60) and depth.shape == (40, 60)
    assert 0 <= clear.min() and clear.max() <= 1 and depth.min() >= 0 and depth.max() <= 1
    assert depth[0].mean() > depth[-1].mean()  # the sky is far, the bottom near
    hazy, clear = make_pair((32, 32), seed=1)
    assert (hazy - clear).abs().mean() > 0.02
    root = tiny_reside(tmp_path, scenes=3, hazes=2)
    assert len(find_pairs(root)) == 6
