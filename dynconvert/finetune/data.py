"""Training and validation data: ImageFolder checks, timm transforms, resumable sampling.

Determinism: the sample order of epoch ``e`` is a permutation seeded by ``(seed, e)``
(``DistributedSampler``, which also shards it over ranks), and each sample's augmentation is
drawn from RNGs seeded by ``(seed, e, index)``. Neither depends on the number of workers or
on where a run was interrupted, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Iterator, Sequence, Sized
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from ..errors import DynconvertError
from .options import FinetuneOptions

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def scan_image_folder(
    root: Path, split: str, *, allow_empty_classes: bool = False
) -> tuple[list[str], int, int]:
    """Classes, image count and skipped (non-image) file count of an ImageFolder tree, by
    file name only (:func:`image_folder` also reads each image's header)."""
    classes, images, skipped, _ = _scan(root, split, False, allow_empty_classes)
    return classes, images, skipped


def _scan(
    root: Path, split: str, check_headers: bool, allow_empty_classes: bool
) -> tuple[list[str], int, int, set[Path]]:
    """:func:`scan_image_folder` plus the image-suffixed files that are not images.

    Reading each header is one small read per file, so a corrupt file is skipped here
    rather than failing the run when its batch comes up; pixels are still only decoded in
    training (a file truncated after its header fails then). A class folder without images
    is refused unless ``allow_empty_classes``: it still counts as a class (an output of the
    head), which is rarely what an empty or misnamed folder was meant to be.
    """
    if not root.exists():
        raise DynconvertError(f"data: {split} folder {root} does not exist", usage=True)
    if not root.is_dir():
        raise DynconvertError(f"data: {root} is not a folder", usage=True)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DynconvertError(
            f"data: {root} has no class folders; expected {root}/<class>/<image> (ImageFolder)",
            usage=True,
        )
    images, unreadable, skipped, empty = 0, set(), 0, []
    for cls in classes:
        before = images
        for path in _files(root / cls):
            if path.suffix.lower() not in IMG_EXTENSIONS:
                skipped += 1
            elif not path.is_file() or (check_headers and not _is_image(path)):
                unreadable.add(path)  # a dangling link, or a file PIL cannot open
            else:
                images += 1
        if images == before:
            empty.append(cls)
    skipped += len(unreadable)
    if empty and images and not allow_empty_classes:
        more = f" (and {len(empty) - 1} more: {', '.join(empty[1:4])})" if len(empty) > 1 else ""
        raise DynconvertError(
            f"data: class folder {root / empty[0]} has no images{more}; add its images or "
            "remove it, or pass --allow-empty-classes (allow_empty_classes=True) to keep it "
            "as a class without images",
            usage=True,
        )
    if images == 0:
        raise DynconvertError(
            f"data: {root} has no images ({skipped} non-image files skipped); "
            f"supported: {', '.join(IMG_EXTENSIONS)}",
            usage=True,
        )
    return classes, images, skipped, unreadable


def _files(folder: Path) -> Iterator[Path]:
    """Every file under ``folder``, through linked folders too, as ImageFolder walks it."""
    for parent, _, names in sorted(os.walk(folder, followlinks=True)):
        for name in sorted(names):
            yield Path(parent) / name


def _is_image(path: Path) -> bool:
    try:
        with Image.open(path):  # lazy: parses the header, decodes nothing
            return True
    except Exception:  # whatever PIL cannot open, the ImageFolder loader cannot either
        return False


def split_folders(data: str | Path) -> tuple[Path, Path | None]:
    """``DIR`` with ``train/`` (and optionally ``val/``), or a single ImageFolder."""
    root = Path(data)
    if not root.exists():
        raise DynconvertError(f"data: folder {root} does not exist", usage=True)
    if (root / "train").is_dir():
        return root / "train", (root / "val") if (root / "val").is_dir() else None
    if (root / "val").is_dir():  # else "val" would become the one class of the training set
        raise DynconvertError(
            f"data: no train/ folder in {root} (it has val/); put the training images in "
            f"{root / 'train'}/<class>/",
            usage=True,
        )
    return root, None


def data_config(model: nn.Module, opts: FinetuneOptions) -> dict[str, Any]:
    """timm's data config for ``model`` (its ``pretrained_cfg``), with the options' overrides."""
    args: dict[str, Any] = {}
    if opts.input_size is not None:
        args["input_size"] = (3, opts.input_size, opts.input_size)
    for name in ("mean", "std", "interpolation", "crop_pct"):
        if getattr(opts, name) is not None:
            args[name] = tuple(v) if isinstance(v := getattr(opts, name), list) else v
    return resolve_data_config(args, model=model)


def build_transforms(config: dict[str, Any], augment: str) -> tuple[Any, Any]:
    eval_tf = create_transform(**config, is_training=False)
    if augment == "timm":
        train_tf = create_transform(**config, is_training=True)
    elif augment == "crop-flip":  # the CIFAR recipe of He et al. 2016, §4.2
        size = config["input_size"][-1]
        train_tf = T.Compose(
            [
                T.Resize(size),
                T.RandomCrop(size, padding=size // 8),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(config["mean"], config["std"]),
            ]
        )
    else:
        train_tf = eval_tf
    return train_tf, eval_tf


def load_rgb(path: str):
    """An image file as 8-bit RGB, as torchvision's loader, except that 16-bit greyscale is
    scaled (``convert("RGB")`` clips it to white) and a failure names the file."""
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            if image.mode.startswith("I"):  # 16-bit greyscale: "I;16", or "I" in older Pillow
                levels = np.asarray(image, dtype=np.float64)
                if image.mode != "I" or levels.max() > 255:
                    levels = levels / 257  # 0..65535 → 0..255
                image = Image.fromarray(levels.clip(0, 255).round().astype(np.uint8))
            return image.convert("RGB")
    except OSError as exc:  # e.g. a file truncated after its header
        raise OSError(f"cannot read image {path}: {exc}") from exc


class ScannedImageFolder(ImageFolder):
    """ImageFolder over the classes :func:`_scan` found: a hidden folder (``.ipynb_checkpoints``)
    is not a class."""

    def __init__(self, root: str, classes: list[str], **kwargs: Any) -> None:
        self.scanned_classes = list(classes)
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self.scanned_classes, {name: i for i, name in enumerate(self.scanned_classes)}


def image_folder(root: Path, transform: Any, split: str, allow_empty_classes: bool = False):
    classes, _, skipped, unreadable = _scan(root, split, True, allow_empty_classes)
    dataset = ScannedImageFolder(
        str(root),
        classes,
        transform=transform,
        loader=load_rgb,
        is_valid_file=lambda p: (
            Path(p).suffix.lower() in IMG_EXTENSIONS and Path(p) not in unreadable
        ),
        allow_empty=True,
    )
    dataset.skipped_files = skipped
    return dataset


def folder_datasets(
    train: str | Path, val: str | Path | None, model: nn.Module, opts: FinetuneOptions
) -> tuple[Dataset, Dataset | None, dict[str, Any]]:
    """ImageFolder datasets for ``train`` (``DIR`` or ``DIR/train``) and ``val``, checked."""
    train_root, default_val = split_folders(train)
    val_root = Path(val) if val is not None else default_val
    config = data_config(model, opts)
    train_tf, eval_tf = build_transforms(config, opts.train_augment)
    allow = opts.allow_empty_classes
    train_set = image_folder(train_root, train_tf, "train", allow)
    val_set = image_folder(val_root, eval_tf, "val", allow) if val_root is not None else None
    if val_set is not None and val_set.classes != train_set.classes:
        only_train = sorted(set(train_set.classes) - set(val_set.classes))
        only_val = sorted(set(val_set.classes) - set(train_set.classes))
        raise DynconvertError(
            f"data: train/ and val/ have different classes (only in train: {only_train or '-'}; "
            f"only in val: {only_val or '-'}); give both the same class folders",
            usage=True,
        )
    info = {
        "classes": list(train_set.classes),
        "skipped_files": train_set.skipped_files + (val_set.skipped_files if val_set else 0),
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
    }
    return train_set, val_set, info


def dataset_classes(dataset: Dataset) -> list[str] | None:
    while isinstance(dataset, (Subset, SeededAugmentation)):
        dataset = dataset.dataset
    classes = getattr(dataset, "classes", None)
    return list(classes) if classes is not None else None


def take_subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """A fixed random ``size``-image subset (the same for every rank and every resume)."""
    if size is None or size >= len(dataset):
        return dataset
    generator = torch.Generator().manual_seed(seed)
    return Subset(
        dataset, sorted(torch.randperm(len(dataset), generator=generator)[:size].tolist())
    )


class SeededAugmentation(Dataset):
    """Draws each sample's random augmentation from RNGs seeded by ``(seed, epoch, index)``.

    The global torch, Python and NumPy RNGs are seeded for the sample and restored
    afterwards, so model-side randomness (dropout, drop-path, mixup) is untouched.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed % (2**63))
            random.seed(sample_seed)
            np.random.seed(sample_seed % (2**32))
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded by ``seed + epoch``) that can start mid-epoch.

    ``skip`` drops the first ``skip`` indices of this rank's epoch order, the ones a resumed
    run already trained on. Without a process group it is a plain seeded shuffle.
    """

    def __init__(self, dataset: Dataset, *, rank: int, world: int, seed: int, shuffle: bool):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def lone_last_batch(sampler: Sized, opts: FinetuneOptions) -> bool:
    """Whether an epoch would end on a batch of one sample, which training drops: BatchNorm
    cannot normalise one value per channel (a 1x1 last stage, as on 32px images)."""
    return len(sampler) > 1 and len(sampler) % opts.batch_size == 1


def iterations_per_epoch(sampler: Sized, opts: FinetuneOptions) -> int:
    full, rest = divmod(len(sampler), opts.batch_size)
    return full + (1 if rest and not lone_last_batch(sampler, opts) else 0)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    sampler: Sequence[int] | None = None,
    collate_fn: Any = None,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> DataLoader:
    # An explicit generator keeps DataLoader from drawing its worker seed from the global RNG.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(0),
    )


def _as_dataset(data: Any) -> tuple[Dataset, Any]:
    if isinstance(data, DataLoader):
        return data.dataset, data.collate_fn
    if isinstance(data, Dataset) or hasattr(data, "__getitem__"):
        return data, None
    raise DynconvertError(
        f"data: expected a Dataset, DataLoader or folder, got {type(data).__name__}"
    )


@dataclasses.dataclass
class TrainData:
    train_set: SeededAugmentation
    sampler: ResumableSampler
    loader: DataLoader
    val_loader: DataLoader | None
    classes: list[str] | None
    skipped_files: int


def prepare_data(
    model: nn.Module,
    train: Any,
    val: Any,
    opts: FinetuneOptions,
    *,
    rank: int,
    world: int,
    pin_memory: bool,
) -> TrainData:
    """Loaders for ``train``/``val`` given as folders, Datasets or DataLoaders (whose dataset
    and collate_fn are kept; sampling is always the seeded, resumable, sharded one)."""
    collate, skipped = None, 0
    if isinstance(train, (str, Path)):
        path_val = val if isinstance(val, (str, Path)) or val is None else None
        train_set, val_set, info = folder_datasets(train, path_val, model, opts)
        skipped = info["skipped_files"]
        if path_val is None and val is not None:
            val_set, _ = _as_dataset(val)
    else:
        train_set, collate = _as_dataset(train)
        val_set = None
        if isinstance(val, (str, Path)):
            _, eval_tf = build_transforms(data_config(model, opts), "none")
            val_set = image_folder(Path(val), eval_tf, "val", opts.allow_empty_classes)
        elif val is not None:
            val_set, _ = _as_dataset(val)
    if len(train_set) == 0:
        raise DynconvertError("data: the training set is empty", usage=True)
    classes = dataset_classes(train_set)
    seeded = SeededAugmentation(take_subset(train_set, opts.train_subset, opts.seed), opts.seed)
    sampler = ResumableSampler(seeded, rank=rank, world=world, seed=opts.seed, shuffle=True)
    common = {
        "batch_size": opts.batch_size,
        "num_workers": opts.num_workers,
        "collate_fn": collate,
        "pin_memory": pin_memory,
    }
    drop_last = lone_last_batch(sampler, opts)
    loader = make_loader(seeded, sampler=sampler, drop_last=drop_last, **common)
    val_loader = None
    if val_set is not None:
        # Every image exactly once over all ranks (DistributedSampler would pad with repeats).
        val_loader = make_loader(val_set, sampler=range(rank, len(val_set), world), **common)
    return TrainData(seeded, sampler, loader, val_loader, classes, skipped)
