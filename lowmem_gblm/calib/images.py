"""Calibration images for vision models: a folder of image files, or saved pixel values.

A folder is read in one of two layouts:

- **ImageFolder**: ``FOLDER/<class_name>/<file>`` (``.png .jpg .jpeg .bmp .gif .webp .tif .tiff``,
  any case); the class of an image is its subfolder's name;
- **flat**: image files directly in ``FOLDER``, with no labels, or with a labels file of
  ``file,label`` lines (CSV; an optional ``file,label`` header; ``file`` relative to FOLDER) that must
  name every image in the folder and nothing else.

Files are taken in sorted order of their path relative to FOLDER, so the same folder always gives the
same tensor. ``nsamples`` picks that many images with a seeded permutation and keeps them in that
sorted order. Class names become ids through, first, an explicit ``label2id``; else the model's
``config.json`` ``label2id`` when it has real names (not transformers' ``LABEL_0, LABEL_1...``
placeholders); else the sorted class names numbered 0, 1, ... A class the mapping does not know is
refused, naming it.

Pixels: when the model folder holds a ``preprocessor_config.json``, transformers'
``AutoImageProcessor`` for it does the preprocessing, exactly as the model expects. Otherwise a
documented default (:func:`default_preprocess`): resize the shorter side to 256 with PIL's bilinear
filter (the other side ``int(256 * long / short)``), center-crop 224x224, scale to [0, 1],
normalize with the ImageNet mean/std.

Colour: RGB images are used as they are; 8-bit grayscale (``L``), 1-bit (``1``) and palette
(``P``) images are converted to RGB (gray is replicated into three equal channels, a palette is
looked up), which is what the models' own processors do (``do_convert_rgb``). Anything else (an alpha
channel: ``LA`` with 2 channels, ``RGBA``; ``CMYK``; 16-bit or float grayscale) is refused rather than
silently altered. An unreadable, truncated or non-image file, or an empty folder, is an
``InputError`` naming the file; the CLI turns it into one ``error:`` line and exit code 2.

``save_pixels`` / ``load_pixels`` keep exact inputs in a safetensors file: ``pixel_values``
float32 ``[N, 3, H, W]`` and optionally ``labels`` int64 ``[N]``.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lowmem_gblm.errors import InputError, UsageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_RESIZE = 256  # shorter side, bilinear
DEFAULT_CROP = 224
RGB_CONVERTIBLE = {"RGB": 3, "L": 1, "1": 1, "P": 1}  # mode -> channels in the file
PROCESSOR_FILE = "preprocessor_config.json"
PROCESS_CHUNK = 64  # images per image-processor call (bounds the memory of decoded images)
PIXEL_KEYS = ("pixel_values", "labels")


def _pil():
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise UsageError("reading images needs Pillow; pip install 'lowmem-gblm[vision]'") from None
    return Image, UnidentifiedImageError


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_image_folder(folder: str | Path) -> list[tuple[Path, str | None]]:
    """(file, class name or None) for every image under ``folder``, sorted by relative path (see module doc)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder {folder} does not exist or is not a folder")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(p for p in folder.iterdir() if is_image_file(p))
    if classes and loose:
        raise InputError(f"image folder {folder} mixes class subfolders ({classes[0].name}/...) with images at its top "
                         f"level ({loose[0].name}); use one layout: FOLDER/<class>/<image> or FOLDER/<image>")
    if not classes:
        items = [(p, None) for p in loose]
    else:
        items = []
        for cls in classes:
            files = sorted(p for p in cls.rglob("*") if is_image_file(p))
            if not files:
                raise InputError(f"class folder {cls} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            items += [(p, cls.name) for p in files]
    if not items:
        raise InputError(f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return items


def read_labels_file(path: str | Path, folder: str | Path) -> dict[Path, str]:
    """``file,label`` lines -> {image path: label}; files are relative to ``folder``."""
    path, folder = Path(path), Path(folder)
    if not path.is_file():
        raise InputError(f"labels file {path} does not exist")
    out: dict[Path, str] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"labels file {path}: cannot read it as file,label lines ({exc})") from exc
    for line, row in enumerate(rows, 1):
        if not row or (line == 1 and [c.strip().lower() for c in row] == ["file", "label"]):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise InputError(f"labels file {path} line {line}: expected 'file,label', got {','.join(row)!r}")
        file = folder / row[0].strip()
        if file in out:
            raise InputError(f"labels file {path} line {line}: {row[0].strip()} is listed twice")
        out[file] = row[1].strip()
    if not out:
        raise InputError(f"labels file {path} holds no file,label lines")
    return out


def model_label2id(model_dir: str | Path | None) -> dict[str, int] | None:
    """The model config's ``label2id`` when it names real classes (not the LABEL_0... placeholders)."""
    if model_dir is None or not (Path(model_dir) / "config.json").is_file():
        return None
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{Path(model_dir) / 'config.json'}: not readable JSON ({exc})") from exc
    mapping = config.get("label2id") if isinstance(config, dict) else None
    if not isinstance(mapping, dict) or not mapping:
        return None
    if all(k == f"LABEL_{v}" for k, v in mapping.items()):
        return None
    return {str(k): int(v) for k, v in mapping.items()}


def label_ids(names: list[str], label2id: dict[str, int] | None, where: str) -> torch.Tensor:
    """[N] int64 ids of class ``names`` through ``label2id`` (or the sorted distinct names when None)."""
    mapping = label2id if label2id is not None else {n: i for i, n in enumerate(sorted(set(names)))}
    unknown = sorted(set(names) - mapping.keys())
    if unknown:
        known = sorted(mapping, key=mapping.get)
        raise InputError(f"{where}: class {unknown[0]!r} is not one of the model's labels "
                         f"({', '.join(known[:10])}{'...' if len(known) > 10 else ''})")
    return torch.tensor([mapping[n] for n in names], dtype=torch.long)


def open_rgb(path: Path):
    """The image in ``path`` as a fully decoded RGB PIL image, or an InputError naming the file."""
    Image, UnidentifiedImageError = _pil()
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later
            mode = img.mode
            if mode not in RGB_CONVERTIBLE:
                bands = len(img.getbands())
                raise InputError(f"image {path}: mode {mode} ({bands} channel{'s' if bands != 1 else ''}) cannot be "
                                 "used as RGB without changing it (alpha, CMYK or high bit depth); save it as 8-bit "
                                 "RGB or grayscale")
            return img.convert("RGB") if mode != "RGB" else img.copy()
    except InputError:
        raise
    except UnidentifiedImageError as exc:
        raise InputError(f"image {path}: not a readable image file ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise InputError(f"image {path}: cannot decode it ({exc})") from exc


def default_preprocess(img, resize: int = DEFAULT_RESIZE, crop: int = DEFAULT_CROP) -> torch.Tensor:
    """RGB PIL image -> [3, crop, crop] float32: shorter side to ``resize`` (bilinear), center crop, ImageNet
    normalization. The fallback for a model folder without preprocessor_config.json."""
    Image, _ = _pil()
    w, h = img.size
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)  # (W, H)
    img = img.resize(size, Image.BILINEAR)
    w, h = img.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    img = img.crop((left, top, left + crop, top + crop))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [3, H, W]
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return ((x - mean) / std).contiguous()


def image_processor(model_dir: str | Path | None):
    """transformers' image processor of ``model_dir`` when it has a preprocessor_config.json, else None."""
    if model_dir is None or not (Path(model_dir) / PROCESSOR_FILE).is_file():
        return None
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{Path(model_dir) / PROCESSOR_FILE}: cannot build the image processor ({exc})") from exc


def preprocess(files: list[Path], model_dir: str | Path | None = None) -> torch.Tensor:
    """[N, 3, H, W] float32 pixel values of ``files``, through the model's image processor or the default."""
    processor = image_processor(model_dir)
    if processor is None:
        log.info("images: no %s in %s; default preprocessing (shorter side %d bilinear, center crop %d, ImageNet "
                 "mean/std)", PROCESSOR_FILE, model_dir, DEFAULT_RESIZE, DEFAULT_CROP)
        return torch.stack([default_preprocess(open_rgb(f)) for f in files])
    log.info("images: preprocessing with %s from %s", type(processor).__name__, model_dir)
    chunks = []
    for i in range(0, len(files), PROCESS_CHUNK):
        images = [open_rgb(f) for f in files[i: i + PROCESS_CHUNK]]
        chunks.append(processor(images=images, return_tensors="pt")["pixel_values"].to(torch.float32))
    return torch.cat(chunks)


def load_image_folder(folder: str | Path, model_dir: str | Path | None = None, nsamples: int | None = None,
                      seed: int = 0, label2id: dict[str, int] | None = None, labels_file: str | Path | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor | None, list[Path]]:
    """(pixel_values [N, 3, H, W] float32, labels [N] int64 or None, files) for the images in ``folder``."""
    folder = Path(folder)
    items = list_image_folder(folder)
    if labels_file is not None:
        if any(cls is not None for _, cls in items):
            raise InputError(f"image folder {folder} has class subfolders; a labels file is for a flat folder")
        labels = read_labels_file(labels_file, folder)
        unlabeled = [p for p, _ in items if p not in labels]
        if unlabeled:
            raise InputError(f"labels file {labels_file} has no label for image {unlabeled[0]}")
        absent = sorted(set(labels) - {p for p, _ in items})
        if absent:
            raise InputError(f"labels file {labels_file} names {absent[0]}, which is not an image in {folder}")
        items = [(p, labels[p]) for p, _ in items]
    if nsamples is not None:
        if nsamples < 1 or nsamples > len(items):
            raise InputError(f"image folder {folder} holds {len(items)} images; cannot take nsamples={nsamples}")
        pick = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:nsamples]
        items = [items[i] for i in sorted(pick.tolist())]
    files = [p for p, _ in items]
    names = [c for _, c in items]
    ids = None
    if names[0] is not None:
        where = f"image folder {folder}" if labels_file is None else f"labels file {labels_file}"
        ids = label_ids(names, label2id if label2id is not None else model_label2id(model_dir), where)
    pixels = preprocess(files, model_dir)
    log.info("images: %d from %s -> pixel_values %s", len(files), folder, list(pixels.shape))
    return pixels, ids, files


def check_pixels(pixel_values: torch.Tensor, labels: torch.Tensor | None, where: str) -> None:
    """pixel_values float [N, 3, H, W] with finite values; labels int [N] when present."""
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.dtype.is_floating_point:
        raise InputError(f"{where}: pixel_values must be a float tensor, got "
                         f"{getattr(pixel_values, 'dtype', type(pixel_values).__name__)}")
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3 or min(pixel_values.shape) < 1:
        raise InputError(f"{where}: pixel_values must be [N, 3, H, W], got {list(pixel_values.shape)}")
    if not bool(torch.isfinite(pixel_values).all()):
        raise InputError(f"{where}: pixel_values holds NaN or infinite values")
    if labels is not None:
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
            raise InputError(f"{where}: labels must be an integer tensor [N], got {labels.dtype} {list(labels.shape)}")
        if labels.shape[0] != pixel_values.shape[0]:
            raise InputError(f"{where}: {labels.shape[0]} labels for {pixel_values.shape[0]} images")


def save_pixels(path: str | Path, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    """Write exact inputs: ``pixel_values`` float32 [N, 3, H, W] and optional ``labels`` int64 [N]."""
    check_pixels(pixel_values, labels, str(path))
    tensors = {"pixel_values": pixel_values.detach().to(torch.float32).contiguous()}
    if labels is not None:
        tensors["labels"] = labels.detach().to(torch.int64).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_pixels(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(pixel_values float32 [N, 3, H, W], labels int64 [N] or None) from a ``--calib-pixels`` file."""
    path = Path(path)
    where = f"--calib-pixels {path}"
    if not path.is_file():
        raise InputError(f"{where}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if "pixel_values" not in keys:
                raise InputError(f"{where}: no tensor named 'pixel_values'")
            extra = sorted(keys - set(PIXEL_KEYS))
            if extra:
                raise InputError(f"{where}: unexpected tensor(s) {', '.join(extra)} (only pixel_values, labels)")
            pixel_values = f.get_tensor("pixel_values")
            labels = f.get_tensor("labels") if "labels" in keys else None
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{where}: not a readable safetensors file ({exc})") from exc
    check_pixels(pixel_values, labels, where)
    return pixel_values.to(torch.float32), None if labels is None else labels.to(torch.int64)
