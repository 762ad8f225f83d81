"""Calibration images for vision models: a folder of image files, or saved pixel values.

A folder is read in one of two layouts:

- **ImageFolder**: ``FOLDER/<class_name>/<file>`` (``.png .jpg .jpeg .bmp .gif .webp .tif .tiff``,
  any case); the class of an image is its subfolder's name;
- **flat**: image files directly in ``FOLDER``, with no labels, or with a labels file of
  ``file,label`` lines (CSV; an optional ``file,label`` header; ``file`` relative to FOLDER) that must
  name every image in the folder and nothing else.

Files are taken in sorted order of their path relative to FOLDER, so the same folder always gives the
same tensor. ``nsamples`` picks that many images with a seeded permutation and keeps them in that
sorted order.

Labels follow the checkpoint: a class name becomes the id the model's ``config.json`` gives it
(``label2id``, and ``id2label`` read backwards), transformers' placeholder names included (``LABEL_3``
is class 3); a name that is a whole number (``4``) and no name of the config is that class id. A class
the config does not know is refused, naming it, unless the classes are renumbered (``renumber``, the
CLI's ``--renumber-labels``): the distinct names in natural order (digits compared as numbers, so
``LABEL_2`` comes before ``LABEL_10``) numbered 0, 1, ... Every class of the folder is checked and
numbered, not only those of the images ``nsamples`` picks. An explicit ``label2id`` replaces the
config's; without a model folder (and without ``label2id``) the classes are renumbered.

Pixels: when the model folder holds a ``preprocessor_config.json``, transformers'
``AutoImageProcessor`` for it does the preprocessing, exactly as the model expects. Otherwise a
documented default (:func:`default_preprocess`): resize the shorter side to 256 with PIL's bilinear
filter (the other side ``int(256 * long / short)``), center-crop 224x224, scale to [0, 1],
normalize with the ImageNet mean/std.

Colour: RGB images are used as they are; 8-bit grayscale (``L``), 1-bit (``1``) and palette
(``P``) images are converted to RGB (gray is replicated into three equal channels, a palette is
looked up), which is what the models' own processors do (``do_convert_rgb``). Anything else (an alpha
channel: ``LA`` with 2 channels, ``RGBA``; ``CMYK``; 16-bit or float grayscale; 16 bits per channel
RGB, which Pillow would silently cut to its high bytes) is refused rather than silently altered. So is
an image larger than Pillow's decompression-bomb limit. An unreadable, truncated or non-image file, or
an empty folder, is an ``InputError`` naming the file; the CLI turns it into one ``error:`` line and
exit code 2. A labels file may start with a UTF-8 byte-order mark (as spreadsheet programs write it).

``save_pixels`` / ``load_pixels`` keep exact inputs in a safetensors file: ``pixel_values``
float32 ``[N, 3, H, W]`` and optionally ``labels`` int64 ``[N]``.
"""

from __future__ import annotations

import csv
import json
import logging
import re
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
CLASS_ID = re.compile(r"[0-9]+")  # a class name that is a class id
HIGH_DEPTH_RAWMODE = re.compile(r";16[BLN]$")  # Pillow's raw modes of 16 bits per channel (PNG, TIFF)
RENUMBER_HINT = "pass --renumber-labels to number the classes 0, 1, ... in natural order of their names"


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
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not a character
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
    """{class name: id} of the model's config.json: its ``label2id`` and its ``id2label`` read backwards,
    transformers' ``LABEL_<i>`` placeholders included; None when there is no config.json or it names no class."""
    if model_dir is None or not (Path(model_dir) / "config.json").is_file():
        return None
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from exc
    config = config if isinstance(config, dict) else {}
    id2label, label2id = config.get("id2label") or {}, config.get("label2id") or {}
    if not isinstance(id2label, dict) or not isinstance(label2id, dict):
        raise InputError(f"{path}: id2label and label2id must be objects")
    try:
        mapping = {str(name): int(i) for i, name in id2label.items()}
        mapping |= {str(name): int(i) for name, i in label2id.items()}
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: id2label / label2id hold an id that is not a whole number ({exc})") from exc
    return mapping or None


def natural_key(name: str) -> tuple:
    """Sort key comparing runs of digits as numbers: ``LABEL_2`` < ``LABEL_10``, ``a9`` < ``a10`` < ``b1``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"([0-9]+)", name) if part)


def renumbered(names: list[str]) -> dict[str, int]:
    """The distinct class ``names`` in natural order, numbered 0, 1, ..."""
    return {n: i for i, n in enumerate(sorted(set(names), key=natural_key))}


def class_id(name: str, label2id: dict[str, int] | None) -> int | None:
    """The id of class ``name``: its entry in ``label2id``, else the number it spells when that is one of the
    mapping's ids (any whole number when there is no mapping); None when it is neither."""
    if label2id and name in label2id:
        return label2id[name]
    if CLASS_ID.fullmatch(name) and (not label2id or int(name) in label2id.values()):
        return int(name)
    return None


def label_ids(names: list[str], label2id: dict[str, int] | None, where: str, renumber: bool = False) -> torch.Tensor:
    """[N] int64 ids of class ``names``: renumbered (``renumber``, see :func:`renumbered`), or each through
    :func:`class_id`; a class neither knows is an InputError naming it and the way out."""
    mapping = renumbered(names) if renumber else label2id
    ids = {n: class_id(n, mapping) for n in set(names)}
    unknown = sorted((n for n, i in ids.items() if i is None), key=natural_key)
    if unknown:
        if mapping:
            known = sorted(mapping, key=lambda n: (mapping[n], natural_key(n)))
            what = (f"is not one of the model's labels ({', '.join(known[:10])}{'...' if len(known) > 10 else ''}) "
                    "nor one of its class ids")
        else:
            what = "is not a class id (0, 1, ...) and the model's config.json names no classes (label2id)"
        raise InputError(f"{where}: class {unknown[0]!r} {what}; name the classes as the model does, or "
                         f"{RENUMBER_HINT}")
    return torch.tensor([ids[n] for n in names], dtype=torch.long)


def open_rgb(path: Path):
    """The image in ``path`` as a fully decoded RGB PIL image, or an InputError naming the file."""
    Image, UnidentifiedImageError = _pil()
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode not in RGB_CONVERTIBLE:
                bands = len(img.getbands())
                raise InputError(f"image {path}: mode {mode} ({bands} channel{'s' if bands != 1 else ''}) cannot be "
                                 "used as RGB without changing it (alpha, CMYK or high bit depth); save it as 8-bit "
                                 "RGB or grayscale")
            if high_bit_depth(img):
                raise InputError(f"image {path}: 16 bits per channel ({mode}); reading it as 8-bit would drop the low "
                                 "bytes; save it as 8-bit RGB or grayscale")
            img.load()  # decode now: a truncated file fails here, not later
            return img.convert("RGB") if mode != "RGB" else img.copy()
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(f"image {path}: too large to decode safely ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"image {path}: not a readable image file ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise InputError(f"image {path}: cannot decode it ({exc})") from exc


def high_bit_depth(img) -> bool:
    """Whether a PIL image (opened, not yet decoded) stores more than 8 bits per channel in a mode Pillow decodes to
    8 bits (16-bit RGB PNG and TIFF: raw mode ``RGB;16B`` and the like)."""
    args = [tile[3] if len(tile) > 3 else None for tile in (img.tile or [])]  # (codec, extents, offset, args)
    raw = [a[0] if isinstance(a, tuple) and a else a for a in args]
    return any(isinstance(r, str) and HIGH_DEPTH_RAWMODE.search(r) for r in raw)


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
                      renumber: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, list[Path]]:
    """(pixel_values [N, 3, H, W] float32, labels [N] int64 or None, files) for the images in ``folder``; labels
    as the module doc says (``renumber``: the class names in natural order numbered 0, 1, ...)."""
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
    ids = None
    if items[0][1] is not None:  # every class of the folder, not only those picked, is checked (and numbered)
        where = f"image folder {folder}" if labels_file is None else f"labels file {labels_file}"
        mapping = label2id if label2id is not None else model_label2id(model_dir)
        ids = label_ids([c for _, c in items], mapping, where, renumber or (mapping is None and model_dir is None))
    if nsamples is not None:
        if nsamples < 1 or nsamples > len(items):
            raise InputError(f"image folder {folder} holds {len(items)} images; cannot take nsamples={nsamples}")
        pick = sorted(torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:nsamples].tolist())
        items = [items[i] for i in pick]
        ids = None if ids is None else ids[pick]
    files = [p for p, _ in items]
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
