"""Distillation losses on soft targets: the teachers' tempered probabilities, averaged when there are several.

Every loss here takes the soft targets as probabilities, not logits, because an ensemble's are a weighted mean
of its teachers' probabilities (teacher_probabilities), which no single set of logits stands for. Each is mixed
with the cross-entropy on the labels the same way: total = alpha * soft + (1 - alpha) * CE, where soft is:
- kd (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"): T² KL(p_T || q_T), p the soft
  targets, q_T = softmax(student / T). T² keeps the soft gradients on the scale of the hard ones whatever T is.
- dkd (Zhao et al., CVPR 2022, "Decoupled Knowledge Distillation"): T² (dkd_alpha TCKD + dkd_beta NCKD), TCKD the
  KL between the binary distributions [p_target, 1 - p_target] of teacher and student, NCKD the KL between their
  distributions over the other classes (renormalised). The paper minimises CE + DKD: alpha 0.5 here is that,
  halved. It is computed from the soft targets, for an ensemble its averaged probabilities. Its linear warm-up
  of the DKD term over the first epochs is not reproduced.
- kd_ls (Sun et al., CVPR 2024, "Logit Standardization in Knowledge Distillation"): kd where the student's and
  the teachers' logits are each z-scored per row before the temperature, so that the student matches the
  teacher's ranking of the classes and not the scale of its logits.
- feature (Romero et al. 2015, "FitNets"): kd here; the Distillation task adds its hint term.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from worker.engine.config import DistillConfig

# Added to the standard deviation before dividing, as in the kd_ls paper's code: a row of equal logits stays zeros.
STANDARDIZE_EPS = 1e-7
# DKD's student distribution over the non-target classes: the target's logit is pushed down by this much rather
# than set to -inf, so that its zero teacher probability times its log-probability stays 0, not nan (the paper's
# code does the same).
DKD_TARGET_MASK = 1000.0


class KDLoss(NamedTuple):
    """A distillation loss and its parts, each a mean over the batch."""

    total: torch.Tensor  # alpha * T² * kd + (1 - alpha) * ce: what is minimised
    kd: torch.Tensor  # the soft term before T² and alpha: KL(p_T || q_T), or dkd_alpha TCKD + dkd_beta NCKD
    ce: torch.Tensor  # cross-entropy of the student's logits against the labels


def standardized(logits: torch.Tensor) -> torch.Tensor:
    """Each row z-scored: zero mean, unit standard deviation (kd_ls)."""
    mean = logits.mean(dim=1, keepdim=True)
    return (logits - mean) / (logits.std(dim=1, keepdim=True) + STANDARDIZE_EPS)


def _tempered(logits: torch.Tensor, config: DistillConfig) -> torch.Tensor:
    """The logits a loss divides by T: z-scored first for kd_ls."""
    return (standardized(logits) if config.loss == "kd_ls" else logits) / config.temperature


def teacher_probabilities(
    teacher_logits: Sequence[torch.Tensor],
    weights: Sequence[float],
    config: DistillConfig,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """N x K soft targets: the mean over teachers of softmax(z / T), weighted, the weights normalised to sum 1.

    config.teacher_weighting makes the weights per image, from the teachers' untempered probabilities (what each
    teacher believes, whatever T): confidence multiplies each teacher's weight by its top probability on the image;
    label_loss by the softmax over teachers of minus their cross-entropies on the true label (that is, in
    proportion to the probability each gives the label). Rows without labels (targets None) keep the fixed weights.
    """
    logits = [z.to(torch.promote_types(z.dtype, torch.float32)) for z in teacher_logits]  # bf16 cached ones
    probabilities = [torch.softmax(_tempered(z, config), dim=1) for z in logits]
    if config.teacher_weighting == "confidence":
        scores = torch.stack([torch.softmax(z, dim=1).amax(dim=1) for z in logits])  # M x N
    elif config.teacher_weighting == "label_loss" and targets is not None:
        label_log_probabilities = torch.stack([torch.log_softmax(z, dim=1).gather(1, targets.view(-1, 1)).squeeze(1)
                                               for z in logits])
        scores = torch.softmax(label_log_probabilities, dim=0)  # the softmax over teachers of minus their CE
    else:
        # Python numbers, not a tensor of weights: no copy to the device, and so no wait for it, at every step.
        return _weighted_sum([weight / sum(weights) for weight in weights], probabilities)
    per_image = torch.stack([weight * score for weight, score in zip(weights, scores, strict=True)])
    return _weighted_sum(list((per_image / per_image.sum(dim=0, keepdim=True)).unsqueeze(2)), probabilities)


def _weighted_sum(weights: Sequence[float | torch.Tensor], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return functools.reduce(torch.add, (weight * tensor for weight, tensor in zip(weights, tensors, strict=True)))


def _kl(soft_targets: torch.Tensor, student_log_probabilities: torch.Tensor) -> torch.Tensor:
    """KL(soft_targets || student), summed over classes, mean over rows."""
    return F.kl_div(student_log_probabilities, soft_targets, reduction="batchmean")


def _decoupled(student_scaled: torch.Tensor, soft_targets: torch.Tensor, targets: torch.Tensor,
               config: DistillConfig) -> torch.Tensor:
    """dkd_alpha TCKD + dkd_beta NCKD (before T²), means over rows; `student_scaled`: the student's logits / T."""
    target_mask = F.one_hot(targets, student_scaled.shape[1]).bool()
    log_all = torch.logsumexp(student_scaled, dim=1)
    log_target = student_scaled.gather(1, targets.view(-1, 1)).squeeze(1) - log_all
    log_others = torch.logsumexp(student_scaled.masked_fill(target_mask, float("-inf")), dim=1) - log_all
    teacher_target = soft_targets.gather(1, targets.view(-1, 1)).squeeze(1)
    teacher_others = (1 - teacher_target).clamp(min=0)
    tckd = _kl(torch.stack([teacher_target, teacher_others], dim=1), torch.stack([log_target, log_others], dim=1))
    teacher_non_target = soft_targets.masked_fill(target_mask, 0) / teacher_others.clamp(
        min=torch.finfo(soft_targets.dtype).tiny).unsqueeze(1)
    student_non_target = torch.log_softmax(student_scaled - DKD_TARGET_MASK * target_mask, dim=1)
    nckd = _kl(teacher_non_target, student_non_target)
    return config.dkd_alpha * tckd + config.dkd_beta * nckd


def _soft(student_logits: torch.Tensor, soft_targets: torch.Tensor, config: DistillConfig,
          targets: torch.Tensor | None) -> torch.Tensor:
    """The soft term before T² and alpha (KDLoss.kd); dkd without targets is kd's."""
    scaled = _tempered(student_logits, config)
    if config.loss == "dkd" and targets is not None:
        return _decoupled(scaled, soft_targets, targets, config)
    return _kl(soft_targets, torch.log_softmax(scaled, dim=1))


def soft_term(student_logits: torch.Tensor, soft_targets: torch.Tensor, config: DistillConfig,
              targets: torch.Tensor | None) -> torch.Tensor:
    """The soft part of the loss with its weights, alpha * T² * soft, a mean over rows: alone, for rows without
    labels (targets None), where dkd, which needs the target class, falls back to kd."""
    return config.alpha * config.temperature**2 * _soft(student_logits, soft_targets, config, targets)


def distillation_loss(student_logits: torch.Tensor, soft_targets: torch.Tensor, targets: torch.Tensor,
                      config: DistillConfig) -> KDLoss:
    """config.loss's loss of the student against the soft targets (teacher_probabilities) and the labels."""
    soft = _soft(student_logits, soft_targets, config, targets)
    hard = F.cross_entropy(student_logits, targets)
    return KDLoss(config.alpha * config.temperature**2 * soft + (1 - config.alpha) * hard, soft, hard)
