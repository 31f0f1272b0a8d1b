"""The training loss as one object, built once from the recipe and handed to the step (torchvision's `criterion`).

`Criterion` covers every target ferkit trains towards: hard labels (with label smoothing and class
weights), class distributions in their place (FER+'s vote distributions), and knowledge distillation
from teachers' soft targets, cached per training image or scored online on the student's own batch
(`ferkit.distill` computes them). The step asks it for a batch's targets, mixes them with the images
(mixup, CutMix) and calls it on the logits: it never knows which loss it computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .distill import distillation_loss, online_soft_targets
from .labels import NUM_CLASSES


@dataclass
class Distillation:
    """The teachers' soft targets at `temperature` and their share `weight` of the loss.

    `cached`: the teachers' probabilities per training image (N, classes), mixed with the labels.
    Otherwise `teachers` score each batch the student sees, as mixed, under autocast to `amp_dtype`.
    """

    weight: float
    temperature: float
    cached: torch.Tensor | None = None
    teachers: tuple[nn.Module, ...] = ()
    amp_dtype: torch.dtype | None = None


@dataclass
class Criterion:
    """loss = (1 - w) CE + w T^2 KL(teachers || softmax(logits / T)); w = 0 without `distillation`.

    CE is -1/N sum_i sum_c v_c t_ic log softmax(logits_i)_c against class distributions t: each label as
    a one-hot row (or the image's row of `distributions`), smoothed to (1 - eps) t + eps / C by
    `label_smoothing`, each class weighted by `class_weights` v (default: 1), the mean over the images.
    """

    num_classes: int = NUM_CLASSES
    label_smoothing: float = 0.0
    class_weights: torch.Tensor | None = None
    distributions: torch.Tensor | None = None
    """Per training image (N, classes): a class distribution that takes the place of its label."""
    distillation: Distillation | None = None

    def targets(self, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """One row per image of the batch, for mixup to mix alike: its class distribution, then (cached
        distillation) its teachers' probabilities. `labels` are the batch's, `index` their training positions."""
        hard = self.distributions[index] if self.distributions is not None else \
            F.one_hot(labels, self.num_classes).float()
        cached = self.distillation.cached if self.distillation is not None else None
        return hard if cached is None else torch.cat([hard, cached[index]], 1)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """The mean loss of `logits` against `targets` (rows of `targets()`, mixed or not); `inputs`: the batch
        the logits came from, which online teachers score."""
        loss = F.cross_entropy(logits.float(), targets[:, : self.num_classes], weight=self.class_weights,
                               label_smoothing=self.label_smoothing)
        d = self.distillation
        if d is None:
            return loss
        if d.cached is not None:
            soft = targets[:, self.num_classes :]
        elif inputs is not None:
            soft = online_soft_targets(list(d.teachers), inputs, d.temperature, d.amp_dtype)
        else:
            raise ValueError("online distillation scores the batch: pass its inputs")
        return (1 - d.weight) * loss + d.weight * distillation_loss(logits, soft, d.temperature)
