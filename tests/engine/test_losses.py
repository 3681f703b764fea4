"""losses: an ensemble's soft targets, DKD and logit-standardised KD against hand computations from their papers'
definitions, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.engine.config import DistillConfig
from worker.engine.losses import distillation_loss, soft_term, teacher_probabilities


def _logits(seed: int, n: int = 6, k: int = 5, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _targets(seed: int, n: int = 6, k: int = 5) -> torch.Tensor:
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


def _softmax_by_hand(z: torch.Tensor) -> torch.Tensor:
    return torch.exp(z) / torch.exp(z).sum(dim=1, keepdim=True)


def test_fixed_weights_average_the_tempered_probabilities() -> None:
    first, second = _logits(0), _logits(1)
    config = DistillConfig(temperature=3.0)
    got = teacher_probabilities([first, second], [1.0, 3.0], config)
    expected = (1.0 * _softmax_by_hand(first / 3) + 3.0 * _softmax_by_hand(second / 3)) / 4
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(6, dtype=torch.float64))


def test_confidence_weights_each_image_by_each_teachers_top_probability() -> None:
    first, second = _logits(2), _logits(3, scale=0.3)  # the second is much less sure of itself
    config = DistillConfig(temperature=2.0, teacher_weighting="confidence")
    got = teacher_probabilities([first, second], [2.0, 1.0], config)
    for row in range(6):
        scores = [2.0 * _softmax_by_hand(first)[row].max(), 1.0 * _softmax_by_hand(second)[row].max()]
        expected = (scores[0] * _softmax_by_hand(first / 2)[row] + scores[1] * _softmax_by_hand(second / 2)[row]) / (
            scores[0] + scores[1])
        torch.testing.assert_close(got[row], expected, rtol=1e-12, atol=0)


def test_label_loss_weights_each_image_by_the_probability_each_teacher_gives_the_label() -> None:
    first, second, targets = _logits(4), _logits(5), _targets(6)
    config = DistillConfig(temperature=4.0, teacher_weighting="label_loss")
    got = teacher_probabilities([first, second], [1.0, 1.0], config, targets)
    cross_entropies = torch.stack([F.cross_entropy(z, targets, reduction="none") for z in (first, second)])
    for row, label in enumerate(targets):
        label_probabilities = [_softmax_by_hand(z)[row, label] for z in (first, second)]
        expected = (label_probabilities[0] * _softmax_by_hand(first / 4)[row]
                    + label_probabilities[1] * _softmax_by_hand(second / 4)[row]) / sum(label_probabilities)
        torch.testing.assert_close(got[row], expected, rtol=1e-10, atol=0)
        # The same, said as the config says it: weights softmax(-CE) over the teachers.
        share = torch.softmax(-cross_entropies[:, row], dim=0)[0]
        assert share.item() == pytest.approx((label_probabilities[0] / sum(label_probabilities)).item(), rel=1e-10)
    # Without labels (cross-task rows) the fixed weights hold.
    torch.testing.assert_close(teacher_probabilities([first, second], [1.0, 1.0], config),
                               teacher_probabilities([first, second], [1.0, 1.0], DistillConfig(temperature=4.0)))


def _dkd_by_hand(student, teacher, targets, config: DistillConfig) -> float:
    """Zhao et al. 2022, eq. (1)-(4) per row: b = [p_t, 1 - p_t] and p̂ = the non-target probabilities renormalised,
    for teacher and student at temperature T; DKD = alpha TCKD + beta NCKD; then mixed with CE as documented."""
    temperature = config.temperature
    p, q = _softmax_by_hand(teacher / temperature), _softmax_by_hand(student / temperature)
    rows = []
    for row, label in enumerate(targets.tolist()):
        b_teacher = torch.stack([p[row, label], 1 - p[row, label]])
        b_student = torch.stack([q[row, label], 1 - q[row, label]])
        tckd = (b_teacher * torch.log(b_teacher / b_student)).sum()
        others = [k for k in range(p.shape[1]) if k != label]
        p_hat, q_hat = p[row, others] / (1 - p[row, label]), q[row, others] / (1 - q[row, label])
        nckd = (p_hat * torch.log(p_hat / q_hat)).sum()
        rows.append(config.dkd_alpha * tckd + config.dkd_beta * nckd)
    dkd = torch.stack(rows).mean() * temperature**2
    return float(config.alpha * dkd + (1 - config.alpha) * F.cross_entropy(student, targets))


@pytest.mark.parametrize(("temperature", "dkd_alpha", "dkd_beta", "alpha"),
                         [(4.0, 1.0, 8.0, 0.5), (1.0, 0.5, 2.0, 0.9), (2.0, 0.0, 1.0, 1.0)])
def test_dkd_matches_the_papers_formula(temperature, dkd_alpha, dkd_beta, alpha) -> None:
    student, teacher, targets = _logits(7), _logits(8), _targets(9)
    config = DistillConfig(loss="dkd", temperature=temperature, dkd_alpha=dkd_alpha, dkd_beta=dkd_beta, alpha=alpha)
    loss = distillation_loss(student, teacher_probabilities([teacher], [1.0], config), targets, config)
    assert loss.total.item() == pytest.approx(_dkd_by_hand(student, teacher, targets, config), rel=1e-9)
    assert loss.ce.item() == pytest.approx(F.cross_entropy(student, targets).item(), rel=1e-12)


def test_dkd_decomposes_kd() -> None:
    """The paper's identity, KD = TCKD + (1 - p_t) NCKD, holds row by row: with a single row, beta = 1 - p_t."""
    student, teacher, targets = _logits(10, n=1), _logits(11, n=1), _targets(12, n=1)
    kd = DistillConfig(temperature=2.0)
    soft_targets = teacher_probabilities([teacher], [1.0], kd)
    beta = 1 - soft_targets[0, targets[0]].item()
    dkd = DistillConfig(loss="dkd", temperature=2.0, dkd_alpha=1.0, dkd_beta=beta)
    assert distillation_loss(student, soft_targets, targets, dkd).kd.item() == pytest.approx(
        distillation_loss(student, soft_targets, targets, kd).kd.item(), rel=1e-9)


def test_dkd_gradients_flow_and_a_step_lowers_it() -> None:
    teacher, targets = _logits(13), _targets(14)
    config = DistillConfig(loss="dkd", temperature=4.0, dkd_beta=8.0, alpha=1.0)
    soft_targets = teacher_probabilities([teacher], [1.0], config)
    student = _logits(15).requires_grad_(True)
    loss = distillation_loss(student, soft_targets, targets, config).total
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    stepped = (student - 0.1 * student.grad).detach()
    assert distillation_loss(stepped, soft_targets, targets, config).total < loss
    # A teacher sure of the label (non-target mass underflowing to 0) still gives finite gradients.
    sure = F.one_hot(targets, 5).double()
    student.grad = None
    distillation_loss(student, sure, targets, config).total.backward()
    assert torch.isfinite(student.grad).all()


def test_soft_term_is_the_weighted_soft_part_and_dkd_without_labels_is_kd() -> None:
    student, teacher, targets = _logits(16), _logits(17), _targets(18)
    for loss in ("kd", "kd_ls", "dkd"):
        config = DistillConfig(loss=loss, temperature=3.0, alpha=0.7)
        soft_targets = teacher_probabilities([teacher], [1.0], config)
        parts = distillation_loss(student, soft_targets, targets, config)
        assert soft_term(student, soft_targets, config, targets).item() == pytest.approx(
            0.7 * 9 * parts.kd.item(), rel=1e-12)
    dkd, kd = DistillConfig(loss="dkd", temperature=3.0), DistillConfig(temperature=3.0)
    soft_targets = teacher_probabilities([teacher], [1.0], kd)
    assert torch.equal(soft_term(student, soft_targets, dkd, None), soft_term(student, soft_targets, kd, None))


def test_kd_ls_standardises_both_sides_before_the_temperature() -> None:
    student, teacher, targets = _logits(19), _logits(20), _targets(21)
    config = DistillConfig(loss="kd_ls", temperature=2.0, alpha=0.8)

    def kd_ls(student_logits, teacher_logits):
        return distillation_loss(student_logits, teacher_probabilities([teacher_logits], [1.0], config), targets,
                                 config)

    def z_score(z):
        return (z - z.mean(dim=1, keepdim=True)) / z.std(dim=1, keepdim=True)

    plain = DistillConfig(temperature=2.0, alpha=0.8)
    by_hand = distillation_loss(z_score(student), teacher_probabilities([z_score(teacher)], [1.0], plain), targets,
                                plain)
    assert kd_ls(student, teacher).kd.item() == pytest.approx(by_hand.kd.item(), rel=1e-6)
    # A teacher's (or the student's) logits shifted or scaled are the same logits to kd_ls, not to kd.
    reference = kd_ls(student, teacher).kd.item()
    assert kd_ls(student, 5 * teacher + 7).kd.item() == pytest.approx(reference, rel=1e-6)
    assert kd_ls(0.2 * student - 3, teacher).kd.item() == pytest.approx(reference, rel=1e-6)
    kd_config = DistillConfig(temperature=2.0)

    def kd(teacher_logits):
        return distillation_loss(student, teacher_probabilities([teacher_logits], [1.0], kd_config), targets,
                                 kd_config).kd.item()

    assert kd(5 * teacher + 7) != pytest.approx(kd(teacher), rel=1e-2)
