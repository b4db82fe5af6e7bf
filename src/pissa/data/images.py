"""Labelled images for image classification: a folder tree or arrays, and their pixel values.

- a folder tree `ROOT/<label>/<image file>` (torchvision's ImageFolder layout): the subfolder is the label.
  Every file is opened and checked with Pillow before any model is loaded; a file that is not an image is
  refused by name (hidden files such as `.DS_Store` are skipped);
- a `.npz` file with `images` (N, H, W) or (N, H, W, C), uint8 in 0..255 or floats in [0, 1], and `labels`
  (N,) of names or whole numbers, optionally `label_names` (K,) naming the whole numbers.

Pixel values come from the model's image processor (its `preprocessor_config.json`), or, for a model that has
none (one built from a config), from a ViT processor at the model's image size with mean = std = 0.5. The
processor is saved beside the trained weights, so stock transformers preprocesses as training did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PissaError
from .labels import LabelSet, label_name


@dataclass
class LabelledImages:
    images: list[np.ndarray]  # each (H, W, C) uint8
    labels: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.labels)


def read_labelled_images(spec: str | Path, limit: int | None = None, channels: int = 3) -> LabelledImages:
    """The images and labels of a folder tree or an .npz file, as (H, W, `channels`) uint8 arrays."""
    path = Path(spec).expanduser()
    if path.is_dir():
        data = read_folder(path, channels)
    elif path.suffix == ".npz" and path.is_file():
        data = read_arrays(path, channels)
    else:
        raise PissaError(f"image data {spec} is neither a folder of class subfolders (ROOT/<label>/<image>) nor an "
                         ".npz file with `images` and `labels`")
    if limit:
        data.images, data.labels = data.images[:limit], data.labels[:limit]
    if not data.labels:
        raise PissaError(f"image data {spec} holds no images")
    return data


def read_folder(root: Path, channels: int) -> LabelledImages:
    from PIL import Image, UnidentifiedImageError

    loose = [p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    if loose:
        raise PissaError(f"{root / loose[0]} lies directly in the image folder; put each image in a subfolder named "
                         f"after its label ({root}/<label>/{loose[0]})")
    images, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            try:
                with Image.open(file) as im:
                    im.load()
                    images.append(as_channels(np.asarray(im.convert("L" if channels == 1 else "RGB")), channels))
            except (UnidentifiedImageError, OSError, SyntaxError) as e:
                raise PissaError(f"{file} is not an image Pillow can read ({e.__class__.__name__}); remove it from "
                                 f"{root} or convert it to PNG/JPEG") from None
            labels.append(label_name(folder.name, str(folder)))
    return LabelledImages(images, labels, str(root))


def read_arrays(path: Path, channels: int) -> LabelledImages:
    arrays = np.load(path, allow_pickle=False)
    missing = [k for k in ("images", "labels") if k not in arrays.files]
    if missing:
        raise PissaError(f"{path} has no `{missing[0]}` array (it holds {', '.join(arrays.files) or 'nothing'}); an "
                         ".npz image set holds `images` (N, H, W[, C]) and `labels` (N,)")
    images, raw = arrays["images"], arrays["labels"]
    if images.ndim not in (3, 4) or len(images) != len(raw):
        raise PissaError(f"{path}: `images` is {images.shape} and `labels` {raw.shape}; give images (N, H, W) or "
                         "(N, H, W, C) with one label each")
    names = [str(n) for n in arrays["label_names"]] if "label_names" in arrays.files else None
    where = f"{path} `labels`"
    labels = [label_name(v.item(), f"{where}[{i}]") for i, v in enumerate(raw)]
    if names is not None:
        labels = [names[int(label)] for label in labels]
    return LabelledImages([as_channels(to_uint8(im, path), channels) for im in images], labels, str(path))


def to_uint8(image: np.ndarray, path: Path) -> np.ndarray:
    if np.issubdtype(image.dtype, np.floating):
        if image.min() < 0 or image.max() > 1:
            raise PissaError(f"{path}: float images must lie in [0, 1] (got {image.min():g}..{image.max():g}); scale "
                             "them, or store uint8 0..255")
        return np.round(image * 255).astype(np.uint8)
    if image.min() < 0 or image.max() > 255:
        raise PissaError(f"{path}: integer images must lie in 0..255 (got {image.min()}..{image.max()})")
    return image.astype(np.uint8)


def as_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) or (H, W, C) -> (H, W, channels): grey repeated, or RGB averaged to grey."""
    image = image[..., None] if image.ndim == 2 else image  # (H, W, C)
    if image.shape[-1] == channels:
        return image
    if image.shape[-1] == 1:
        return np.repeat(image, channels, axis=-1)  # (H, W, channels)
    if channels == 1:
        return image[..., :3].mean(-1, keepdims=True).round().astype(np.uint8)  # (H, W, 1)
    raise PissaError(f"images have {image.shape[-1]} channels but the model takes {channels}")


def image_processor(folder: str | Path | None, hf_config):
    """The model's own image processor, or a ViT one at its image size (mean = std = 0.5) if it has none."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError):
        pass
    try:
        from transformers import ViTImageProcessorPil as processor_class  # no torchvision needed
    except ImportError:
        from transformers import ViTImageProcessor as processor_class
    size, channels = hf_config.image_size, hf_config.num_channels
    return processor_class(size={"height": size, "width": size}, image_mean=[0.5] * channels,
                           image_std=[0.5] * channels)


def encode_images(data: LabelledImages, processor, label_set: LabelSet) -> list[dict]:
    """Rows {pixel_values (C, H, W), labels}."""
    ids = label_set.ids(data.labels, data.source)
    pixels = processor(data.images, return_tensors="pt", input_data_format="channels_last")["pixel_values"]
    return [{"pixel_values": pixels[i], "labels": ids[i]} for i in range(len(ids))]  # pixels (N, C, H, W)
