"""Hinton's loss (losses.distillation_loss, loss "kd") and its parts against a hand computation from the softmax
definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.engine.config import DistillConfig
from worker.engine.losses import KDLoss, distillation_loss, teacher_probabilities


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float,
            alpha: float) -> KDLoss:
    # Unvalidated: the high-temperature limit below goes past the temperatures a job may ask for.
    config = DistillConfig.model_construct(temperature=temperature, alpha=alpha)
    return distillation_loss(student, teacher_probabilities([teacher], [1.0], config), targets, config)


def _random_batch(seed: int = 0, n: int = 6, k: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(n, k, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(n, k, generator=generator, dtype=torch.float64) * 3
    targets = torch.randint(0, k, (n,), generator=generator)
    return student, teacher, targets


def _parts_by_hand(student, teacher, targets, temperature: float) -> tuple[float, float]:
    """(KL(teacher_T || student_T), CE(student, targets))."""
    def log_softmax(z):
        return z - torch.log(torch.exp(z).sum(dim=1, keepdim=True))

    teacher_probs = torch.exp(teacher / temperature) / torch.exp(teacher / temperature).sum(dim=1, keepdim=True)
    kl = (teacher_probs * (torch.log(teacher_probs) - log_softmax(student / temperature))).sum(dim=1).mean()
    cross_entropy = -log_softmax(student)[torch.arange(len(targets)), targets].mean()
    return float(kl), float(cross_entropy)


def _by_hand(student, teacher, targets, temperature: float, alpha: float) -> float:
    kl, cross_entropy = _parts_by_hand(student, teacher, targets, temperature)
    return alpha * temperature**2 * kl + (1 - alpha) * cross_entropy


@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 0.5), (4.0, 0.9), (2.5, 0.3)])
def test_matches_hand_computation(temperature: float, alpha: float) -> None:
    student, teacher, targets = _random_batch()
    loss = kd_loss(student, teacher, targets, temperature, alpha)
    got = loss.total.item()
    assert got == pytest.approx(_by_hand(student, teacher, targets, temperature, alpha), rel=1e-10)
    kl, cross_entropy = _parts_by_hand(student, teacher, targets, temperature)
    assert (loss.kd.item(), loss.ce.item()) == (pytest.approx(kl, rel=1e-10), pytest.approx(cross_entropy, rel=1e-10))


def test_alpha_zero_is_exactly_cross_entropy() -> None:
    student, teacher, targets = _random_batch(1)
    assert torch.equal(kd_loss(student, teacher, targets, 4.0, 0.0).total, F.cross_entropy(student, targets))


def test_alpha_one_is_the_soft_term_only() -> None:
    student, teacher, targets = _random_batch(2)
    loss = kd_loss(student, teacher, targets, 3.0, 1.0).total
    assert loss.item() == pytest.approx(_by_hand(student, teacher, targets, 3.0, 1.0), rel=1e-10)
    assert torch.equal(loss, kd_loss(student, teacher, (targets + 1) % student.shape[1], 3.0, 1.0).total)
    assert kd_loss(teacher, teacher, targets, 3.0, 1.0).total.item() == pytest.approx(0.0, abs=1e-12)


def test_t_squared_keeps_gradients_on_the_scale_of_the_logit_gap() -> None:
    """At high T the soft term's gradient tends to (s - t) / (N K) (Hinton et al.): T-independent."""
    student, teacher, targets = _random_batch(3)
    student, teacher = student - student.mean(1, keepdim=True), teacher - teacher.mean(1, keepdim=True)
    n, k = student.shape
    gradients = {}
    for temperature in (100.0, 200.0):
        logits = student.clone().requires_grad_(True)
        kd_loss(logits, teacher, targets, temperature, 1.0).total.backward()
        gradients[temperature] = logits.grad
    expected = (student - teacher) / (n * k)
    for gradient in gradients.values():
        assert (gradient - expected).norm() / expected.norm() < 0.02
    # Without the T² factor the gradient would shrink 4x from T=100 to T=200.
    assert gradients[200.0].norm() / gradients[100.0].norm() == pytest.approx(1.0, abs=0.01)
