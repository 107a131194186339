"""Folder data as users have it, and runs that must not end in a silently wrong model.

Hidden folders and linked sub-folders, 16-bit PNGs, a file truncated after its header; a
step that leaves non-finite weights behind a finite loss; a reset head that follows the seed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from finetune_helpers import QUIET, make_image_folder, tensor_data, tiny_model
from PIL import Image
from torch import nn

import dynconvert
from dynconvert import DynconvertError
from dynconvert.finetune.data import image_folder, load_rgb, scan_image_folder
from dynconvert.finetune.models import reset_head


def test_a_hidden_folder_is_not_a_class(tmp_path):
    root = make_image_folder(tmp_path / "train", per_class=2)
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "x.png").write_bytes((root / "a" / "000.png").read_bytes())
    dataset = image_folder(root, None, "train")
    assert dataset.classes == ["a", "b", "c"] and len(dataset) == 6


def test_images_in_a_linked_sub_folder_count_and_a_broken_one_is_skipped(tmp_path):
    root = make_image_folder(tmp_path / "train", classes=("a", "b"), per_class=2)
    elsewhere = make_image_folder(tmp_path / "more", classes=("x",), per_class=3) / "x"
    (elsewhere / "empty.png").write_bytes(b"")
    only_linked = root / "c"
    only_linked.mkdir()
    (only_linked / "linked").symlink_to(elsewhere, target_is_directory=True)
    classes, images, _ = scan_image_folder(root, "train")
    assert classes == ["a", "b", "c"] and images == 2 + 2 + 4
    dataset = image_folder(root, None, "train")
    assert len(dataset) == 7 and dataset.skipped_files == 1  # the empty file
    assert all(dataset[i][0].size == (16, 16) for i in range(len(dataset)))


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "i16.png"
    levels = np.array([[0, 16384], [32768, 65535]], dtype=np.uint16)
    Image.fromarray(levels).save(path)
    assert Image.open(path).mode.startswith("I;16")
    rgb = np.asarray(load_rgb(str(path)))
    assert rgb.shape == (2, 2, 3)
    assert rgb[..., 0].tolist() == [[0, 64], [128, 255]]


def test_sixteen_bit_values_in_a_32_bit_image_are_scaled_too(tmp_path):
    """Older Pillow opens 16-bit PNGs as mode "I"; a 32-bit TIFF is "I" in every version."""
    path = tmp_path / "i32.tif"
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I").save(path)
    assert Image.open(path).mode == "I"
    assert np.asarray(load_rgb(str(path)))[..., 0].tolist() == [[0, 255]]
    small = tmp_path / "i32_8bit.tif"  # mode "I" holding 8-bit values stays as it is
    Image.fromarray(np.array([[0, 200]], dtype=np.int32), mode="I").save(small)
    assert np.asarray(load_rgb(str(small)))[..., 0].tolist() == [[0, 200]]


def test_a_dangling_link_is_skipped_like_an_unreadable_file(tmp_path):
    root = make_image_folder(tmp_path / "train", classes=("a",), per_class=2)
    (root / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    dataset = image_folder(root, None, "train")
    assert len(dataset) == 2 and dataset.skipped_files == 1
    assert all(dataset[i][0].size == (16, 16) for i in range(len(dataset)))


def test_a_file_truncated_after_its_header_is_named(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(OSError, match=f"cannot read image {path}"):
        load_rgb(str(path))


class _NonFiniteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class _PoisonsItsGradients(nn.Module):
    def forward(self, x):
        return _NonFiniteGradient.apply(x)


def test_a_finite_loss_with_non_finite_gradients_stops_before_anything_is_saved(tmp_path):
    model = nn.Sequential(*tiny_model(), _PoisonsItsGradients())  # every gradient NaN
    checkpoint = tmp_path / "c.pt"
    with pytest.raises(DynconvertError, match="weights became non-finite") as error:
        dynconvert.finetune(model, tensor_data(8), epochs=1, batch_size=8, checkpoint=checkpoint,
                            **QUIET)  # fmt: skip
    assert "no checkpoint was written" in str(error.value)
    assert not checkpoint.exists()


def test_a_reset_head_follows_the_seed_not_the_global_rng():
    heads = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        model = tiny_model()
        state = torch.random.get_rng_state()
        reset_head(model, 5, seed=3)
        assert torch.equal(torch.random.get_rng_state(), state)  # left as it was
        heads.append(model[-1].weight.detach().clone())
    assert heads[0].shape == (5, 8) and torch.equal(heads[0], heads[1])


def test_an_epoch_never_ends_on_a_batch_of_one_for_batchnorm(tmp_path):
    """9 samples in batches of 4: the lone ninth would fail BatchNorm on a 1x1 last stage."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=8), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3)
    )
    dynconvert.convert(model, skip_stem=False)
    checkpoint = tmp_path / "nine.ckpt"
    result = dynconvert.finetune(model, tensor_data(9), epochs=2, batch_size=4,
                                 checkpoint=checkpoint, **QUIET)  # fmt: skip
    assert len(result.history) == 2
    assert torch.load(checkpoint, weights_only=True)["iteration"] == 2 * 2  # 4 + 4, one dropped
    dynconvert.finetune(tiny_model(), tensor_data(10), epochs=1, batch_size=4,
                        checkpoint=tmp_path / "ten.ckpt", **QUIET)  # fmt: skip
    assert torch.load(tmp_path / "ten.ckpt", weights_only=True)["iteration"] == 3  # 4 + 4 + 2


def test_a_checkpoint_that_trained_the_lone_sample_as_a_batch_resumes_rescaled(tmp_path):
    """Earlier versions ran ceil(9 / 4) = 3 batches per epoch where this one runs 2."""
    checkpoint = tmp_path / "c.ckpt"
    options = dict(batch_size=4, checkpoint=checkpoint, **QUIET)
    dynconvert.finetune(tiny_model(), tensor_data(9), epochs=1, **options)
    state = torch.load(checkpoint, weights_only=True)
    state["iteration"] = 3  # as the earlier version wrote it
    torch.save(state, checkpoint)
    with pytest.warns(UserWarning, match="earlier dynconvert.*iteration count rescaled"):
        dynconvert.finetune(tiny_model(), tensor_data(9), epochs=2, resume=checkpoint, **options)
    assert torch.load(checkpoint, weights_only=True)["iteration"] == 4
    with pytest.raises(DynconvertError, match="ran 3 batches per epoch, this data gives 5"):
        state["epoch"], state["iteration"] = 1, 3
        torch.save(state, checkpoint)
        dynconvert.finetune(tiny_model(), tensor_data(20), epochs=2, resume=checkpoint, **options)


def test_a_float64_model_trains_on_float32_images(tmp_path):
    root = make_image_folder(tmp_path / "train", per_class=4)
    model = tiny_model().double()
    result = dynconvert.finetune(model, root, epochs=1, batch_size=4, input_size=16, **QUIET)
    assert len(result.history) == 1 and all(p.dtype == torch.float64 for p in model.parameters())


def test_options_object_and_keywords_together_are_refused():
    from dynconvert.finetune import FinetuneOptions

    with pytest.raises(DynconvertError, match=r"not both \(got options and epochs, lr\)"):
        dynconvert.finetune(tiny_model(), tensor_data(8), options=FinetuneOptions(epochs=1),
                            epochs=3, lr=5.0)  # fmt: skip
