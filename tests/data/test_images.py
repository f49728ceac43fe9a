"""ImageFolder loading, its errors, and the training transforms."""

import numpy as np
import pytest

from rmlora_jax.data import images


def write_folder(root, *, classes=("a", "b", "c"), per_class=4, size=8, seed=0):
  """``root/{train,test}/<class>/*.png``: each class a colour channel, plus noise."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  for split in ("train", "test"):
    for c, name in enumerate(classes):
      (root / split / name).mkdir(parents=True)
      for i in range(per_class):
        x = rng.integers(0, 60, size=(size, size, 3))
        x[..., c % 3] += 180
        Image.fromarray(x.astype(np.uint8)).save(root / split / name / f"{i:03d}.png")
  return root


def test_image_folder_keeps_the_named_classes_in_order_and_resizes(tmp_path):
  root = write_folder(tmp_path)
  split = images.load_image_folder(root, "train", image_size=(16, 12), classes=("c", "a"))
  assert split.class_names == ("c", "a") and split.images.shape == (8, 16, 12, 3)
  np.testing.assert_array_equal(split.labels, [0] * 4 + [1] * 4)
  assert split.images[:4, ..., 2].mean() > 150 and split.images[4:, ..., 0].mean() > 150  # class c is blue
  every = images.load_image_folder(root, "test", image_size=(8, 8))
  assert every.class_names == ("a", "b", "c") and len(every) == 12


def test_bad_folders_and_files_give_one_line_errors_naming_them(tmp_path):
  root = write_folder(tmp_path)
  (root / "train" / "empty").mkdir()
  with pytest.raises(ValueError, match=r"class folder .*empty' holds no image files"):
    images.load_image_folder(root, "train", image_size=(8, 8))
  with pytest.raises(ValueError, match=r"classes \['zebra'\] are not among"):
    images.load_image_folder(root, "test", image_size=(8, 8), classes=("a", "zebra"))
  with pytest.raises(ValueError, match="has no 'validation' folder"):
    images.load_image_folder(root, "validation", image_size=(8, 8))
  (root / "test" / "b" / "broken.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(ValueError, match=r"unreadable image file .*broken\.jpg") as e:
    images.load_image_folder(root, "test", image_size=(8, 8))
  assert "\n" not in str(e.value)


def test_augment_crops_within_the_padding_and_flips_and_normalize_is_the_processors():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, size=(64, 6, 6, 3)).astype(np.uint8)
  np.testing.assert_array_equal(images.augment(x, rng, padding=0, flip=False), x)
  flipped = images.augment(x, np.random.default_rng(1), padding=0, flip=True)
  same = [np.array_equal(f, o) for f, o in zip(flipped, x)]
  assert all(s or np.array_equal(f, o[:, ::-1]) for s, f, o in zip(same, flipped, x)) and 10 < sum(same) < 54
  cropped = images.augment(x, np.random.default_rng(2), padding=2, flip=False)
  assert cropped.shape == x.shape and cropped.dtype == np.uint8
  # Every crop equals one of the 5 x 5 windows of its zero-padded image, and
  # the offsets vary over the batch (the centred window is offset (2, 2)).
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  offsets = []
  for c, p in zip(cropped, padded):
    found = [(dy, dx) for dy in range(5) for dx in range(5) if np.array_equal(c, p[dy:dy + 6, dx:dx + 6])]
    assert found, "a crop that is no window of the padded image"
    offsets.append(found[0])
  assert len(set(offsets)) > 10 and any(o != (2, 2) for o in offsets)
  y = images.normalize(x[:2], mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.1))
  assert y.shape == (2, 3, 6, 6) and y.dtype == np.float32
  np.testing.assert_allclose(y[1, 2], (x[1, ..., 2] / 255.0 - 0.3) / 0.1, rtol=1e-5)


def test_hub_loader_reads_a_datasets_copy_with_cifar100s_columns(tmp_path, monkeypatch):
  """A local parquet copy with CIFAR-100's columns (img, fine_label) stands in for uoft-cs/cifar100."""
  datasets = pytest.importorskip("datasets")
  from PIL import Image
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
  features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["x", "y", "z"])})
  rng = np.random.default_rng(0)
  (tmp_path / "hub" / "data").mkdir(parents=True)
  for split in ("train", "test"):
    pictures = [Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)) for _ in range(6)]
    datasets.Dataset.from_dict({"img": pictures, "fine_label": [0, 1, 2, 0, 1, 2]}, features=features).to_parquet(
        str(tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet"))
  split = images.load_hub(str(tmp_path / "hub"), "test", image_size=(4, 4), classes=("z", "x"))
  assert split.class_names == ("z", "x") and split.images.shape == (4, 4, 4, 3)
  np.testing.assert_array_equal(split.labels, [1, 0, 1, 0])
  with pytest.raises(ValueError, match="cannot be loaded"):
    images.load_hub(str(tmp_path / "missing"), "test", image_size=(4, 4))
