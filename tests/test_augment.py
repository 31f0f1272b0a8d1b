"""Preprocessing and the batched training augmentation, on real faces."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from ferkit.augment import AugmentConfig, jpeg_compress, train_transform
from ferkit.data import FerData
from ferkit.inference import predict_logits, preprocess, to_tensor
from ferkit.models import create_model


@pytest.fixture(scope="module")
def faces(small_data: FerData) -> np.ndarray:
    """128 real training faces, uint8 (128, 48, 48), every class represented."""
    images = small_data["train"].images[::2][:128]
    assert len(np.unique(small_data["train"].labels[::2][:128])) == 7
    return images


def reference_normalise(images: np.ndarray) -> torch.Tensor:
    """(x / 255 - 0.5) / 0.5, written out with numpy, as (N, 1, 48, 48)."""
    return torch.from_numpy(((images.astype(np.float32) / 255.0 - 0.5) / 0.5)[:, None])


def test_preprocess_maps_0_to_minus_1_and_255_to_1(faces: np.ndarray) -> None:
    batch = np.stack([np.zeros((48, 48), np.uint8), np.full((48, 48), 255, np.uint8), faces[0]])
    out = preprocess(batch)
    assert out.shape == (3, 1, 48, 48) and out.dtype == torch.float32
    assert torch.all(out[0] == -1.0) and torch.all(out[1] == 1.0)
    face = faces[0].astype(np.float64)
    assert out[2].min().item() == pytest.approx(face.min() / 127.5 - 1, abs=1e-6)
    assert out[2].max().item() == pytest.approx(face.max() / 127.5 - 1, abs=1e-6)
    torch.testing.assert_close(preprocess(faces), reference_normalise(faces), rtol=0, atol=1e-6)


def test_preprocess_accepts_channel_dim_and_tensors_but_not_floats(faces: np.ndarray) -> None:
    expected = preprocess(faces[:4])
    torch.testing.assert_close(preprocess(faces[:4, None]), expected, rtol=0, atol=0)
    torch.testing.assert_close(preprocess(torch.from_numpy(faces[:4])), expected, rtol=0, atol=0)
    with pytest.raises(TypeError, match="uint8"):
        to_tensor(faces[:4].astype(np.float32))


def test_no_augmentation_is_exactly_preprocess(faces: np.ndarray) -> None:
    config = AugmentConfig(hflip=False, rotate_degrees=0)
    out = train_transform(to_tensor(faces), config, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, preprocess(faces), rtol=0, atol=0)


def _flipped_mask(out: torch.Tensor, faces: np.ndarray) -> np.ndarray:
    plain = preprocess(faces)
    mirrored = preprocess(np.ascontiguousarray(faces[:, :, ::-1]))
    same = torch.all((out == plain).flatten(1), dim=1).numpy()
    flipped = torch.all((out == mirrored).flatten(1), dim=1).numpy()
    assert not np.any(same & flipped)  # real faces are never pixel-symmetric
    assert np.all(same | flipped), "every output must be the input or its exact mirror image"
    return flipped


def test_hflip_mirrors_about_half_reproducibly(faces: np.ndarray) -> None:
    config = AugmentConfig(hflip=True, rotate_degrees=0)
    out = train_transform(to_tensor(faces), config, torch.Generator().manual_seed(1234))
    flipped = _flipped_mask(out, faces)
    assert 0.3 < flipped.mean() < 0.7
    again = train_transform(to_tensor(faces), config, torch.Generator().manual_seed(1234))
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    other = _flipped_mask(train_transform(to_tensor(faces), config, torch.Generator().manual_seed(99)), faces)
    assert not np.array_equal(other, flipped)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])


def test_rotation_keeps_shape_and_range_and_stays_close_to_the_input(faces: np.ndarray) -> None:
    config = AugmentConfig(hflip=False, rotate_degrees=10)
    out = train_transform(to_tensor(faces), config, torch.Generator().manual_seed(0))
    plain = preprocess(faces)
    assert out.shape == (128, 1, 48, 48) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    changed = torch.any((out != plain).flatten(1), dim=1)
    assert changed.float().mean() > 0.8  # nearest sampling: angles under ~0.8 degrees move no pixel
    own = [_correlation(out[i], plain[i]) for i in range(len(faces))]
    other = [_correlation(out[i], plain[(i + 1) % len(faces)]) for i in range(len(faces))]
    # A rotation within +-10 degrees keeps the face: strongly correlated with its input, far more than
    # with the next face (seed 0: median 0.81 against 0.13).
    assert np.median(own) > 0.7 and min(own) > 0.2
    assert np.median(other) < 0.4
    assert np.mean(np.array(own) > np.array(other)) > 0.95
    torch.testing.assert_close(train_transform(to_tensor(faces), config, torch.Generator().manual_seed(0)), out,
                               rtol=0, atol=0)


def test_large_rotations_fill_the_corners_with_black(faces: np.ndarray) -> None:
    config = AugmentConfig(hflip=False, rotate_degrees=45)
    out = train_transform(to_tensor(faces), config, torch.Generator().manual_seed(0))
    corners = out[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    input_corners = preprocess(faces)[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (input_corners == -1).all(dim=1).float().mean() < 0.2
    assert (corners == -1).all(dim=1).float().mean() > 0.8


def test_shift_is_an_exact_integer_translation(faces: np.ndarray) -> None:
    config = AugmentConfig(hflip=False, rotate_degrees=0, shift_pixels=3)
    out = train_transform(to_tensor(faces[:32]), config, torch.Generator().manual_seed(0))
    padded = np.pad(faces[:32], ((0, 0), (3, 3), (3, 3)))
    shifts = set()
    for i in range(32):
        matches = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                   if torch.equal(out[i], preprocess(padded[i : i + 1, 3 + dy : 51 + dy, 3 + dx : 51 + dx])[0])]
        assert matches, f"image {i} is not a shifted copy of its input"
        shifts.add(matches[0])
    assert len(shifts) > 5


def test_erasing_blanks_one_rectangle_to_mid_grey(faces: np.ndarray) -> None:
    config = AugmentConfig(hflip=False, rotate_degrees=0, erasing=1.0)
    out = train_transform(to_tensor(faces[:32]), config, torch.Generator().manual_seed(0))
    plain = preprocess(faces[:32])
    assert not (plain == 0).any()  # 127.5 is not a uint8 value, so 0 marks erased pixels
    for i in range(32):
        erased = (out[i, 0] == 0).numpy()
        rows, cols = np.flatnonzero(erased.any(1)), np.flatnonzero(erased.any(0))
        assert erased[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()  # one filled rectangle
        assert 0.01 < erased.mean() < 0.3
        torch.testing.assert_close(out[i, 0][~torch.from_numpy(erased)], plain[i, 0][~torch.from_numpy(erased)])


def test_eval_path_is_normalisation_only(faces: np.ndarray) -> None:
    torch.manual_seed(0)
    model = create_model("refcnn")
    model.train()  # predict_logits must switch to eval mode and back
    logits = predict_logits(model, faces[:16], batch_size=5)
    assert model.training
    model.eval()
    with torch.no_grad():
        expected = model(reference_normalise(faces[:16]))
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(predict_logits(model, faces[:16]), logits, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Camera augmentations: each switchable, each changing real faces as specified


CAMERA_OFF = AugmentConfig(hflip=False, rotate_degrees=0.0)


def _camera(faces: np.ndarray, seed: int = 0, **setting: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(unaugmented, augmented) [0, 1] batches of real faces with one camera setting on."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x = to_tensor(faces[:64]).float() / 255
    out = train_transform(to_tensor(faces[:64]), dataclasses.replace(CAMERA_OFF, **setting), generator)
    return x, (out * 0.5 + 0.5)  # back from [-1, 1]


@pytest.mark.parametrize("setting", [
    {"scale_jitter": 0.2}, {"aspect_jitter": 0.2}, {"brightness": 0.3}, {"contrast": 0.4}, {"gamma": 0.4},
    {"blur": 1.0}, {"noise": 1.0}, {"jpeg": 1.0}, {"downsample": 1.0},
])
def test_each_camera_augmentation_changes_faces_and_keeps_shape_dtype_and_range(
    faces: np.ndarray, setting: dict[str, float]
) -> None:
    x, out = _camera(faces, **setting)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6
    changed = (out - x).abs().flatten(1).mean(1)
    # Nearest-neighbour sampling leaves a face whose zoom or stretch drew within ~2% of 1 unchanged.
    assert (changed > 1e-3).float().mean() > 0.75, f"{setting}: most faces unchanged"
    # Off (0) is off: exactly the unaugmented, normalised batch.
    _, off = _camera(faces, **{name: 0.0 for name in setting})
    torch.testing.assert_close(off, x, rtol=0, atol=1e-6)


def test_camera_augmentations_do_what_they_say(faces: np.ndarray) -> None:
    x, bright = _camera(faces, brightness=0.3)
    shift = (bright - x).flatten(1).mean(1)
    assert shift.abs().max() <= 0.3 + 1e-4 and (shift > 0.02).any() and (shift < -0.02).any()
    x, flat = _camera(faces, contrast=0.4)
    ratio = flat.flatten(1).std(1) / x.flatten(1).std(1)
    assert ratio.min() > 0.5 and ratio.max() < 1.5 and (ratio < 0.9).any() and (ratio > 1.1).any()
    x, blurred = _camera(faces, blur=1.0)
    assert (blurred.diff(dim=-1).abs().mean() < 0.9 * x.diff(dim=-1).abs().mean())
    x, noisy = _camera(faces, noise=1.0)
    assert 0.02 < (noisy - x).std() < 0.06  # std 0.05, less what clipping to [0, 1] takes
    x, small = _camera(faces, downsample=1.0)
    assert small.diff(dim=-1).abs().mean() < 0.9 * x.diff(dim=-1).abs().mean()  # detail lost
    x, compressed = _camera(faces, jpeg=1.0)
    assert 0.005 < (compressed - x).abs().mean() < 0.1
    # A zoom keeps the centre pixel where it was, and moves the corners' content.
    x, zoomed = _camera(faces, scale_jitter=0.3)
    assert (zoomed[..., 23:25, 23:25] - x[..., 23:25, 23:25]).abs().mean() < (zoomed - x).abs().mean()


@pytest.mark.parametrize("quality", [20, 50, 80])
def test_jpeg_augmentation_matches_pillows_encoder(faces: np.ndarray, quality: int) -> None:
    """On real faces, the batched codec lands within a grey level of Pillow's JPEG at the same quality, while
    compression itself moves pixels by several (measured: 0.16 / 0.26 / 0.53 against 7.9 / 5.6 / 3.7 levels)."""
    x = to_tensor(faces[:100]).float() / 255
    ours = jpeg_compress(x, torch.full((len(x),), float(quality)))
    pillow = []
    for face in faces[:100]:
        encoded = io.BytesIO()
        Image.fromarray(face.reshape(48, 48)).save(encoded, format="JPEG", quality=quality)
        pillow.append(np.asarray(Image.open(encoded)))
    reference = torch.from_numpy(np.stack(pillow)).float().view_as(x) / 255
    gap, change = float((ours - reference).abs().mean() * 255), float((reference - x).abs().mean() * 255)
    assert gap < 0.8 and change > 3, (gap, change)
    odd = jpeg_compress(x[:4, :, :45, :47], torch.full((4,), float(quality)))  # partial edge blocks
    assert odd.shape == (4, 1, 45, 47)


def test_camera_augmentations_are_reproducible_from_the_seeds(faces: np.ndarray) -> None:
    setting = {"brightness": 0.3, "contrast": 0.3, "gamma": 0.3, "blur": 0.5, "noise": 0.5, "jpeg": 0.5,
               "downsample": 0.5, "scale_jitter": 0.1, "aspect_jitter": 0.1}
    _, a = _camera(faces, seed=3, **setting)
    _, b = _camera(faces, seed=3, **setting)
    _, c = _camera(faces, seed=4, **setting)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
