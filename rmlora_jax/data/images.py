"""Image classification data: ImageFolder trees, the hub's CIFAR-100, and the training transforms.

An `ImageSplit` holds decoded images as one uint8 array (N, H, W, 3) at the
model's input size, their integer labels and the class names. Two sources:

* `load_image_folder`: the common ImageFolder layout,
  ``<root>/<split>/<class>/*.jpg`` (torchvision's and `datasets`'
  ``imagefolder``), e.g. the offline CIFAR-10 JPEGs in ``../shared/data/cifar10``;
* `load_hub`: a `datasets` hub copy such as ``uoft-cs/cifar100`` (needs a network).

Both may keep only some classes (``classes=("dog", "frog")``), relabelled
0..C-1 in the order given, which is how the transfer experiments split ten
classes into two disjoint tasks.

`augment` is the training transform (random crop after zero padding and a
random horizontal flip, CIFAR's standard), `normalize` the processor's
normalisation into the (B, C, H, W) float layout the ViT takes.

Example::

  train = load_image_folder("../shared/data/cifar10", "train", classes=("dog", "cat"), image_size=(32, 32))
  pixels = normalize(augment(train.images[:8], np.random.default_rng(0)), mean=(0.5,) * 3, std=(0.5,) * 3)
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

# File suffixes read as images in an ImageFolder tree (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


@dataclasses.dataclass(frozen=True)
class ImageSplit:
  """Decoded images of one split and their labels."""

  # (N, H, W, 3) uint8 RGB.
  images: np.ndarray
  # (N,) int32, indices into class_names.
  labels: np.ndarray
  # The names of labels 0..C-1.
  class_names: tuple[str, ...]

  def __post_init__(self):
    assert self.images.ndim == 4 and self.images.shape[-1] == 3, self.images.shape
    assert self.labels.shape == (self.images.shape[0],), (self.labels.shape, self.images.shape)

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def _check_classes(available: Sequence[str], classes: Sequence[str] | None, where: str) -> tuple[str, ...]:
  """``classes`` (or every available one), checked to exist and to be distinct."""
  if not classes:
    return tuple(available)
  classes = tuple(classes)
  unknown = [c for c in classes if c not in available]
  if unknown:
    raise ValueError(f"{where}: classes {unknown} are not among the {len(available)} available: {list(available)}")
  if len(set(classes)) != len(classes):
    raise ValueError(f"{where}: classes {list(classes)} name a class twice")
  return classes


def list_image_folder(root: str | os.PathLike, split: str,
                      classes: Sequence[str] | None = None) -> dict[str, list[pathlib.Path]]:
  """``{class name: sorted image files}`` of ``<root>/<split>/<class>/``.

  Args:
    root: the ImageFolder root, holding one folder per split.
    split: "train" or "test" (any sub-folder name).
    classes: the classes to keep, in this order; None or empty: every class
      folder, sorted by name.

  Raises:
    ValueError: the split folder is missing or has no class folders, a named
      class is absent, or a kept class folder holds no image file.
  """
  folder = pathlib.Path(root) / split
  if not folder.is_dir():
    raise ValueError(f"image folder {str(root)!r} has no {split!r} folder (expected {split}/<class>/*.jpg)")
  available = sorted(p.name for p in folder.iterdir() if p.is_dir())
  if not available:
    raise ValueError(f"image folder {str(folder)!r} has no class folders (expected {split}/<class>/*.jpg)")
  out = {}
  for name in _check_classes(available, classes, f"image folder {str(folder)!r}"):
    files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
      raise ValueError(f"class folder {str(folder / name)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    out[name] = files
  return out


def decode_image(source: Any, size: tuple[int, int], *, name: str = "<image>") -> np.ndarray:
  """One image as (H, W, 3) uint8 RGB at ``size`` = (height, width), resized bilinearly if needed.

  Args:
    source: a path, a file object or a PIL image.
    size: the model's input (height, width).
    name: how an unreadable image is named in the error.

  Raises:
    ValueError: the image cannot be decoded (naming it).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    image = source if isinstance(source, Image.Image) else Image.open(source)
    image = image.convert("RGB")
    if image.size != (size[1], size[0]):  # PIL sizes are (width, height)
      image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f"unreadable image file {name}: {type(e).__name__}: {e}") from e


def load_image_folder(root: str | os.PathLike, split: str, *, image_size: tuple[int, int],
                      classes: Sequence[str] | None = None) -> ImageSplit:
  """Decodes ``<root>/<split>/<class>/*`` into an `ImageSplit` (see `list_image_folder`)."""
  files = list_image_folder(root, split, classes)
  images, labels = [], []
  for label, paths in enumerate(files.values()):
    for path in paths:
      images.append(decode_image(path, image_size, name=repr(str(path))))
      labels.append(label)
  return ImageSplit(np.stack(images), np.asarray(labels, np.int32), tuple(files))


def load_hub(name: str, split: str, *, image_size: tuple[int, int],
             classes: Sequence[str] | None = None) -> ImageSplit:
  """A `datasets` hub copy (``uoft-cs/cifar100``: columns ``img`` and ``fine_label``) as an `ImageSplit`.

  The image column is the first of ``img``, ``image``; the label column the
  first of ``fine_label``, ``label`` (a ``ClassLabel``, whose names are used).

  Raises:
    ValueError: the dataset cannot be loaded, or has no such columns.
  """
  try:
    import datasets  # pylint: disable=g-import-not-at-top
    ds = datasets.load_dataset(name, split=split)
  except Exception as e:  # offline, unknown name: both end the same way
    raise ValueError(f"hub dataset {name!r} (split {split!r}) cannot be loaded ({type(e).__name__}: {e}); "
                     f"offline, give an ImageFolder root as config.data.dir") from e
  image_key = next((k for k in ("img", "image") if k in ds.column_names), None)
  label_key = next((k for k in ("fine_label", "label") if k in ds.column_names), None)
  if image_key is None or label_key is None:
    raise ValueError(f"hub dataset {name!r} has columns {ds.column_names}; expected an image column "
                     f"(img or image) and a label column (fine_label or label)")
  names = tuple(ds.features[label_key].names)
  keep = _check_classes(names, classes, f"hub dataset {name!r}")
  relabel = {names.index(c): i for i, c in enumerate(keep)}
  labels = np.asarray(ds[label_key])
  rows = np.flatnonzero(np.isin(labels, list(relabel)))
  images = np.stack([decode_image(ds[int(i)][image_key], image_size, name=f"{name}[{split}][{int(i)}]")
                     for i in rows])
  return ImageSplit(images, np.asarray([relabel[int(v)] for v in labels[rows]], np.int32), keep)


def augment(images: np.ndarray, rng: np.random.Generator, *, padding: int = 4, flip: bool = True) -> np.ndarray:
  """Random crop of each image after zero-padding ``padding`` pixels, then a random horizontal flip.

  Args:
    images: (B, H, W, C) uint8.
    rng: draws the offsets and flips (seed it from (seed, epoch) for exact resumes).
    padding: pixels of zero padding on every side; 0: no crop.
    flip: flip each image left-right with probability 1/2.

  Returns:
    (B, H, W, C) uint8, the same shape.
  """
  b, h, w, _ = images.shape
  out = images
  if padding > 0:
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    dy, dx = rng.integers(0, 2 * padding + 1, size=(2, b))
    out = np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
  if flip:
    flips = rng.random(b) < 0.5
    out = np.where(flips[:, None, None, None], out[:, :, ::-1], out)
  return out


def normalize(images: np.ndarray, *, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 (B, H, W, C) -> float32 (B, C, H, W): ``(x / 255 - mean) / std`` per channel (the processor's)."""
  x = images.astype(np.float32) / 255.0
  x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)))
