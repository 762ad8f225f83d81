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
    with pytest.raises(InputError, match="class 'cat' is not one of the model's labels.*--renumber-labels"):
        load_image_folder(folder, model)  # issue 32 case 4: not silently renumbered
    assert load_image_folder(folder, model, renumber=True)[1].tolist() == [0, 0, 1, 1]
    (model / "config.json").write_text(json.dumps({"label2id": {"dog": 0, "bird": 1}}))
    with pytest.raises(InputError, match="class 'cat' is not one of the model's labels"):
        load_image_folder(folder, model)


def _config(model, n: int, **extra):
    """config.json of a classifier with ``n`` classes as transformers writes it (placeholder names LABEL_<i>)."""
    model.mkdir(exist_ok=True)
    labels = {"id2label": {str(i): f"LABEL_{i}" for i in range(n)}, "label2id": {f"LABEL_{i}": i for i in range(n)}}
    (model / "config.json").write_text(json.dumps(labels | extra))
    return model


def test_placeholder_class_folders_keep_the_config_ids(tmp_path):
    """Issue 32 case 4 / issue 37 case 2's note: folders named as the config's labels keep their ids (LABEL_3,
    LABEL_4 -> 3, 4, not 0, 1), and LABEL_10 is not sorted as text before LABEL_2."""
    model = _config(tmp_path / "model", 12)
    for name in ("LABEL_3", "LABEL_4"):
        solid(tmp_path / "a" / name / "x.png", (1, 2, 3))
    assert load_image_folder(tmp_path / "a", model)[1].tolist() == [3, 4]
    for name in ("LABEL_10", "LABEL_2", "LABEL_11"):
        solid(tmp_path / "b" / name / "x.png", (1, 2, 3))
    _, ids, files = load_image_folder(tmp_path / "b", model)
    assert [(f.parent.name, i) for f, i in zip(files, ids.tolist(), strict=True)] == [
        ("LABEL_10", 10), ("LABEL_11", 11), ("LABEL_2", 2)]
    # only id2label (label2id left out): read backwards
    (model / "config.json").write_text(json.dumps({"id2label": {"0": "ant", "1": "bee", "2": "LABEL_2",
                                                                "10": "LABEL_10", "11": "LABEL_11"}}))
    assert load_image_folder(tmp_path / "b", model)[1].tolist() == [10, 11, 2]
    # asked for: renumbered in natural order (LABEL_2 < LABEL_10 < LABEL_11)
    assert load_image_folder(tmp_path / "b", model, renumber=True)[1].tolist() == [1, 2, 0]


def test_numeric_labels_are_class_ids_and_unknown_names_are_refused(tmp_path):
    """Issue 32 case 4: a labels CSV of 0, 1, 4 keeps class 4 (it became 2); a name the config does not know is
    refused with the way out; a model whose config names no classes takes class ids."""
    root = tmp_path / "flat"
    for name in ("x1.png", "x2.png", "x3.png"):
        solid(root / name, (9, 9, 9))
    labels = tmp_path / "labels.csv"
    labels.write_text("x1.png,0\nx2.png,4\nx3.png,1\n")
    model = _config(tmp_path / "model", 5)
    assert load_image_folder(root, model, labels_file=labels)[1].tolist() == [0, 4, 1]
    assert load_image_folder(root, model, labels_file=labels, renumber=True)[1].tolist() == [0, 2, 1]
    labels.write_text("x1.png,0\nx2.png,7\nx3.png,1\n")  # 7: not a class of the model
    with pytest.raises(InputError, match=r"labels file .*: class '7' is not one of the model's labels \(LABEL_0, "):
        load_image_folder(root, model, labels_file=labels)
    (model / "config.json").write_text("{}")  # a config without labels: whole numbers are ids, names are not
    assert load_image_folder(root, model, labels_file=labels)[1].tolist() == [0, 7, 1]
    labels.write_text("x1.png,cat\nx2.png,dog\nx3.png,cat\n")
    with pytest.raises(InputError, match="'cat' is not a class id .* names no classes.*--renumber-labels"):
        load_image_folder(root, model, labels_file=labels)


def test_renumber_labels_is_fingerprinted_only_when_asked_for():
    """--renumber-labels changes the labels (GBLM's loss): a resume must not mix the two; runs without it keep the
    fingerprint they had before the option existed."""
    from lowmem_gblm.config import CalibConfig, PruneConfig
    from lowmem_gblm.errors import UsageError

    def calib_of(**kw):
        config = PruneConfig(model_dir="m", out_dir="o", calib=CalibConfig(images="imgs", **kw))
        return config.fingerprint_dict()["calib"]

    assert "renumber_labels" not in calib_of()
    assert calib_of(renumber_labels=True)["renumber_labels"] is True
    with pytest.raises(UsageError, match="--renumber-labels needs --calib-images"):
        CalibConfig(pixels_file="p.safetensors", renumber_labels=True)


def test_labels_file_with_a_byte_order_mark(tmp_path):
    """A CSV saved with a UTF-8 BOM (spreadsheets do) was blamed on its labels: the BOM hid the header."""
    root = tmp_path / "flat"
    for name in ("x1.png", "x2.png"):
        solid(root / name, (9, 9, 9))
    labels = tmp_path / "labels.csv"
    labels.write_bytes("file,label\nx1.png,1\nx2.png,0\n".encode("utf-8-sig"))
    assert load_image_folder(root, _config(tmp_path / "model", 2), labels_file=labels)[1].tolist() == [1, 0]


def png_16bit_rgb(path, size=(8, 8)):
    """A valid PNG of 16 bits per RGB channel (Pillow cannot write one), values that differ in the low bytes."""
    import struct
    import zlib

    w, h = size
    rows = np.arange(w * h * 3, dtype=">u2").reshape(h, w * 3) * 97
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    return write_png(path, struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0), zlib.compress(raw))


def write_png(path, ihdr: bytes, idat: bytes):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def bomb_png(path, side=15000):
    """A PNG header of side x side RGB pixels (more than Pillow's decompression-bomb limit) with a token IDAT."""
    import struct
    import zlib

    return write_png(path, struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0), zlib.compress(b"\x00" * 64))


def test_16_bit_png_and_decompression_bomb_are_refused_naming_the_file(tmp_path):
    """Issue 32 case 5: a 16-bit-per-channel PNG was read as 8-bit (its high bytes); case 14: a 15000x15000 PNG
    was a DecompressionBombError traceback."""
    deep = png_16bit_rgb(tmp_path / "deep" / "c" / "d.png")
    assert Image.open(deep).mode == "RGB"  # what Pillow reports: the depth shows only in its raw mode
    with pytest.raises(InputError, match=r"d\.png: 16 bits per channel"):
        load_image_folder(tmp_path / "deep", renumber=True)
    bomb_png(tmp_path / "big" / "c" / "b.png")
    with pytest.raises(InputError, match=r"b\.png: too large to decode safely"):
        load_image_folder(tmp_path / "big", renumber=True)


def test_model_image_processor_is_used_when_present(folder, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BitImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "size": {"shortest_edge": 40}, "resample": 3, "do_center_crop": True, "crop_size": {"height": 28, "width": 28},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}))
    x, _, _ = load_image_folder(folder, model, renumber=True)  # a folder without config.json: no labels to follow
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
