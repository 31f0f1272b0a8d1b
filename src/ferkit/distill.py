"""Knowledge distillation: teachers' soft targets, cached once or computed on each batch, and the soft-target loss.

Two schemes (`TrainConfig.teacher_mode`). `cached`, chosen for CPUs: each teacher (a shipped name, run
folder or weights file) scores every training image once, unaugmented, with its own test-time views,
before the first epoch; the logits are cached in the run folder (`teacher_logits.safetensors`, reused
on resume when the teachers and images are the same). Each step then costs the student nothing extra:
its augmented batch is pulled toward the teacher's view of the clean face. A teacher's ten views cost
about ten student forward passes an image, so scoring them on every augmented batch would cost more
than the training.

`online` ("consistent teaching", Beyer et al. 2022, "Knowledge distillation: a good teacher is patient
and consistent"): each teacher scores the student's own augmented, mixed batch, one view, so the student
matches the teacher's function on the very images it sees. It costs one teacher forward pass per step
(no backward), about a third of a step for a teacher the student's size.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import InputError
from .inference import DEFAULT_PREPROCESSING, predict_logits
from .outputs import atomic_write
from .weights import load_model, resolve_weights

CACHE_NAME = "teacher_logits.safetensors"


def _fingerprint(teachers: list[Path], images: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for path in teachers:
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    digest.update(images.cpu().numpy().tobytes())
    return digest.hexdigest()


def teacher_logits(
    teachers: list[str], images: torch.Tensor, device: torch.device, batch_size: int = 512,
    cache_dir: Path | None = None,
) -> torch.Tensor:
    """(teachers, N, classes) float32 logits of each teacher on uint8 `images` (N, 1, 48, 48), its own views.

    Cached in `cache_dir` and reused when the teacher files and the images are the same.
    """
    paths = [resolve_weights(t) for t in teachers]
    key = _fingerprint(paths, images)
    cache = cache_dir / CACHE_NAME if cache_dir is not None else None
    if cache is not None and cache.exists():
        try:
            with safe_open(str(cache), framework="pt") as f:
                if (f.metadata() or {}).get("fingerprint") == key:
                    return f.get_tensor("logits")
        except (SafetensorError, OSError):
            pass  # a damaged cache is recomputed
    outputs = []
    for path in paths:
        model, meta = load_model(path, device)
        outputs.append(predict_logits(model, images, device, batch_size, meta.preprocessing))
    logits = torch.stack(outputs).float()
    if cache is not None:
        with atomic_write(cache) as tmp:
            save_file({"logits": logits.contiguous()}, str(tmp), metadata={"fingerprint": key})
    return logits


def load_teachers(teachers: list[str], device: torch.device) -> list[torch.nn.Module]:
    """The teachers' networks in eval mode, for `online` teaching on the student's normalised batches.

    Their input must be normalised as training normalises the student's, so teachers whose weights say
    otherwise are refused.
    """
    models = []
    for name in teachers:
        path = resolve_weights(name)
        model, meta = load_model(path, device)
        p = meta.preprocessing
        if (p.image_size, p.mean, p.std) != (DEFAULT_PREPROCESSING.image_size, DEFAULT_PREPROCESSING.mean,
                                             DEFAULT_PREPROCESSING.std):
            raise InputError(f"{path}: online teaching needs a teacher with ferkit's input normalisation (mean "
                             f"{DEFAULT_PREPROCESSING.mean}, std {DEFAULT_PREPROCESSING.std}), not {p.mean}, {p.std}")
        models.append(model.eval().requires_grad_(False))
    return models


@torch.no_grad()
def online_soft_targets(
    teachers: list[torch.nn.Module], batch: torch.Tensor, temperature: float, amp_dtype: torch.dtype | None
) -> torch.Tensor:
    """The teachers' mean probability at `temperature` on the normalised `batch` the student is about to see."""
    with torch.autocast(batch.device.type, dtype=amp_dtype or torch.float32, enabled=bool(amp_dtype)):
        logits = torch.stack([teacher(batch).float() for teacher in teachers])
    return soft_targets(logits, temperature)


def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teachers' mean probability at `temperature`: (teachers, N, classes) -> (N, classes)."""
    return torch.softmax(logits / temperature, dim=-1).mean(0)


def distillation_loss(student_logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(targets || softmax(student / T)) * T^2 (Hinton et al.), the mean over the batch.

    The T^2 keeps the soft-target gradients on the scale of the hard-label loss's as T changes.
    """
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(log_student, targets, reduction="batchmean") * temperature**2
