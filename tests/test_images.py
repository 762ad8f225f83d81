"""Calibration images: folder layouts, labels, preprocessing goldens, bad files, saved pixel values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")

from lowmem_gblm.calib.images import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    default_preprocess,
    load_image_folder,
    load_pixels,
    open_rgb,
    save_pixels,
)
from lowmem_gblm.errors import InputError  # noqa: E402

MEAN = torch.tensor(IMAGENET_MEAN)[:, None, None]
STD = torch.tensor(IMAGENET_STD)[:, None, None]


def solid(path, color, size=(40, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def normalized(rgb):
    return (torch.tensor(rgb, dtype=torch.float32)[:, None, None] / 255 - MEAN) / STD


@pytest.fixture
def folder(tmp_path):
    """ImageFolder: cat/{a,b}.png, dog/{a.png, c.jpg}, each a solid colour."""
    root = tmp_path / "imgs"
    solid(root / "cat" / "b.png", (200, 10, 10))
    solid(root / "cat" / "a.png", (10, 200, 10))
    solid(root / "dog" / "a.png", (10, 10, 200), size=(30, 50))
    solid(root / "dog" / "c.jpg", (128, 128, 128))
    return root


def test_default_preprocessing_of_a_constant_image_is_the_hand_value(tmp_path):
    img = open_rgb(solid(tmp_path / "x.png", (10, 128, 250), size=(300, 200)))
    x = default_preprocess(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    torch.testing.assert_close(x, normalized((10, 128, 250)).expand(3, 224, 224), rtol=0, atol=1e-6)


def test_default_preprocessing_resizes_the_shorter_side_and_crops_the_center(tmp_path):
    a = np.zeros((200, 400, 3), np.uint8)  # H=200, W=400: left half black, right half white
    a[:, 200:] = 255
    Image.fromarray(a).save(tmp_path / "half.png")
    x = default_preprocess(open_rgb(tmp_path / "half.png"))
    # resized to 512x256; crop columns 144..367; the edge (256 after resizing) lands at crop column 112
    torch.testing.assert_close(x[:, :, :110], normalized((0, 0, 0)).expand(3, 224, 110), rtol=0, atol=1e-6)
    torch.testing.assert_close(x[:, :, 114:], normalized((255, 255, 255)).expand(3, 224, 110), rtol=0, atol=1e-6)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    solid(tmp_path / "g" / "gray.png", 77, mode="L")
    x, labels, files = load_image_folder(tmp_path / "g")
    assert labels is None and [f.name for f in files] == ["gray.png"]
    torch.testing.assert_close(x[0], normalized((77, 77, 77)).expand(3, 224, 224), rtol=0, atol=1e-6)


def test_image_folder_order_labels_and_subsets(folder):
    x, labels, files = load_image_folder(folder)
    assert [f"{f.parent.name}/{f.name}" for f in files] == ["cat/a.png", "cat/b.png", "dog/a.png", "dog/c.jpg"]
    assert labels.tolist() == [0, 0, 1, 1] and labels.dtype == torch.long
    assert x.shape == (4, 3, 224, 224)
    torch.testing.assert_close(x[1], normalized((200, 10, 10)).expand(3, 224, 224), rtol=0, atol=1e-6)
    again = load_image_folder(folder)
    assert torch.equal(again[0], x) and again[2] == files
    sub_x, sub_labels, sub_files = load_image_folder(folder, nsamples=2, seed=3)
    assert len(sub_files) == 2 and sub_files == sorted(sub_files)  # a seeded pick, kept in sorted order
    assert torch.equal(sub_x, x[[files.index(f) for f in sub_files]])
    assert load_image_folder(folder, nsamples=2, seed=3)[2] == sub_files
    with pytest.raises(InputError, match="holds 4 images; cannot take nsamples=5"):
        load_image_folder(folder, nsamples=5)


def test_class_names_go_through_the_model_label2id(folder, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"label2id": {"dog": 0, "cat": 1, "bird": 2}}))
    assert load_image_folder(folder, model)[1].tolist() == [1, 1, 0, 0]
    assert load_image_folder(folder, label2id={"cat": 5, "dog": 7})[1].tolist() == [5, 5, 7, 7]
    (model / "config.json").write_text(json.dumps({"label2id": {"LABEL_0": 0, "LABEL_1": 1}}))  # placeholders
    assert load_image_folder(folder, model)[1].tolist() == [0, 0, 1, 1]
    (model / "config.json").write_text(json.dumps({"label2id": {"dog": 0, "bird": 1}}))
    with pytest.raises(InputError, match="class 'cat' is not one of the model's labels"):
        load_image_folder(folder, model)


def test_model_image_processor_is_used_when_present(folder, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BitImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "size": {"shortest_edge": 40}, "resample": 3, "do_center_crop": True, "crop_size": {"height": 28, "width": 28},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}))
    x, _, _ = load_image_folder(folder, model)
    assert x.shape == (4, 3, 28, 28) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], normalized((10, 200, 10)).expand(3, 28, 28), rtol=0, atol=1e-5)


def test_flat_folder_with_a_labels_file(tmp_path):
    root = tmp_path / "flat"
    for name, c in [("x1.png", 10), ("x2.png", 20), ("x3.png", 30)]:
        solid(root / name, (c, c, c))
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\nx2.png,dog\nx1.png,cat\nx3.png,dog\n")
    _, ids, files = load_image_folder(root, labels_file=labels)
    assert [f.name for f in files] == ["x1.png", "x2.png", "x3.png"] and ids.tolist() == [0, 1, 1]
    labels.write_text("x1.png,cat\nx2.png,dog\n")
    with pytest.raises(InputError, match=r"has no label for image .*x3\.png"):
        load_image_folder(root, labels_file=labels)
    labels.write_text("x1.png,cat\nx2.png,dog\nx3.png,dog\nx9.png,cat\n")
    with pytest.raises(InputError, match=r"names .*x9\.png, which is not an image"):
        load_image_folder(root, labels_file=labels)
    labels.write_text("x1.png\n")
    with pytest.raises(InputError, match="line 1: expected 'file,label'"):
        load_image_folder(root, labels_file=labels)


def _png_bytes(tmp_path, mode, color, size=(16, 16)):
    return solid(tmp_path / f"src_{mode}.png", color, size=size, mode=mode).read_bytes()


@pytest.mark.parametrize("case,needle", [
    ("truncated", "cannot decode it"),
    ("not_an_image", "not a readable image file"),
    ("two_channels", r"mode LA \(2 channels\)"),
    ("alpha", r"mode RGBA \(4 channels\)"),
])
def test_bad_image_names_the_file(tmp_path, case, needle):
    root = tmp_path / "bad"
    solid(root / "ok" / "fine.png", (1, 2, 3))
    bad = root / "ok" / "zz_bad.png"
    if case == "truncated":
        data = _png_bytes(tmp_path, "RGB", (5, 6, 7), size=(64, 64))
        bad.write_bytes(data[: len(data) // 2])
    elif case == "not_an_image":
        bad.write_text("this is text, not a PNG\n")
    elif case == "two_channels":
        bad.write_bytes(_png_bytes(tmp_path, "LA", (9, 200)))
    else:
        bad.write_bytes(_png_bytes(tmp_path, "RGBA", (9, 9, 9, 100)))
    with pytest.raises(InputError, match=needle) as err:
        load_image_folder(root)
    assert str(bad) in str(err.value)


def test_empty_and_mixed_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty holds no images"):
        load_image_folder(tmp_path / "empty")
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    with pytest.raises(InputError, match=r"class folder .*cat holds no images"):
        load_image_folder(tmp_path / "classes")
    solid(tmp_path / "mixed" / "cat" / "a.png", (1, 1, 1))
    solid(tmp_path / "mixed" / "b.png", (1, 1, 1))
    with pytest.raises(InputError, match="mixes class subfolders"):
        load_image_folder(tmp_path / "mixed")
    with pytest.raises(InputError, match="does not exist"):
        load_image_folder(tmp_path / "nope")


def test_save_load_pixels_round_trip_is_exact(tmp_path):
    x = torch.randn(5, 3, 8, 6)
    y = torch.tensor([3, 1, 4, 1, 5])
    save_pixels(tmp_path / "p.safetensors", x, y)
    x2, y2 = load_pixels(tmp_path / "p.safetensors")
    assert torch.equal(x2, x) and torch.equal(y2, y) and y2.dtype == torch.int64
    save_pixels(tmp_path / "q.safetensors", x)
    assert load_pixels(tmp_path / "q.safetensors")[1] is None


def test_bad_pixel_files_name_the_file(tmp_path):
    from safetensors.torch import save_file

    def bad(name, tensors, needle):
        path = tmp_path / name
        save_file(tensors, str(path))
        with pytest.raises(InputError, match=needle) as err:
            load_pixels(path)
        assert str(path) in str(err.value)

    x = torch.zeros(2, 3, 4, 4)
    bad("rank.safetensors", {"pixel_values": torch.zeros(3, 4, 4)}, r"must be \[N, 3, H, W\]")
    bad("channels.safetensors", {"pixel_values": torch.zeros(2, 2, 4, 4)}, r"must be \[N, 3, H, W\]")
    bad("int.safetensors", {"pixel_values": torch.zeros(2, 3, 4, 4, dtype=torch.uint8)}, "must be a float tensor")
    bad("nolabels.safetensors", {"pixel_values": x, "labels": torch.zeros(3, dtype=torch.long)}, "3 labels for 2")
    bad("floatlabels.safetensors", {"pixel_values": x, "labels": torch.zeros(2)}, "labels must be an integer")
    bad("other.safetensors", {"input_ids": torch.zeros(2, 3, dtype=torch.long)}, "no tensor named 'pixel_values'")
    bad("extra.safetensors", {"pixel_values": x, "mask": torch.zeros(2)}, "unexpected tensor")
    bad("nan.safetensors", {"pixel_values": torch.full((1, 3, 2, 2), float("nan"))}, "NaN")
    (tmp_path / "junk.safetensors").write_text("not safetensors")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_pixels(tmp_path / "junk.safetensors")
    with pytest.raises(InputError, match="no such file"):
        load_pixels(tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match="2 labels for 1"):
        save_pixels(tmp_path / "out.safetensors", torch.zeros(1, 3, 2, 2), torch.zeros(2, dtype=torch.long))
