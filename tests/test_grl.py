"""Gradient reversal, domain classifier, DANN lambda schedule."""

import math

import pytest
import torch

from dgseg.layers import DomainClassifier, GradientReversal, dann_lambda, grad_reverse


@pytest.mark.parametrize("lambd", [0.0, 0.3, 1.0, 2.5])
def test_forward_is_identity_and_backward_is_minus_lambda(lambd):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, requires_grad=True)
    y = grad_reverse(x, lambd)
    assert torch.equal(y, x)
    upstream = torch.randn_like(x)
    (grad,) = torch.autograd.grad(y, x, upstream)
    assert torch.equal(grad, -lambd * upstream)


def test_zero_lambda_gives_exact_zero_gradient():
    x = torch.randn(2, 3, requires_grad=True)
    grad_reverse(x, 0.0).sum().backward()
    assert torch.count_nonzero(x.grad) == 0


def test_module_lambda_settable_per_step():
    layer = GradientReversal(lambd=1.0)
    x = torch.ones(4, requires_grad=True)
    for lambd in (0.0, 0.5, 2.0):
        layer.lambd = lambd
        x.grad = None
        layer(x).sum().backward()
        assert torch.equal(x.grad, torch.full_like(x, -lambd))
    assert "lambd=2.0" in repr(layer)


def test_gradcheck_reversal_is_not_the_forward_derivative():
    # The forward is the identity; its true Jacobian is I. The reversed backward claims -lambda I,
    # so gradcheck must reject it for lambda != -1 and accept it for lambda = -1 (no reversal).
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert not torch.autograd.gradcheck(lambda t: grad_reverse(t, 1.0), (x,), raise_exception=False)
    assert torch.autograd.gradcheck(lambda t: grad_reverse(t, -1.0), (x,))


@pytest.mark.parametrize("lambd", [0.0, 0.7, 3.0])
def test_gradcheck_float64_against_minus_lambda_map(lambd):
    # F(x) = GRL(x) + stop_grad(-lambda x - x) has forward -lambda x and, if the GRL backward is
    # exactly -lambda * grad, the analytic Jacobian of that map: gradcheck then passes in float64.
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def f(t):
        return grad_reverse(t, lambd) + (-lambd * t - t).detach()

    assert torch.allclose(f(x), -lambd * x)
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_grad_reverse_rejects_non_finite_lambda():
    with pytest.raises(ValueError, match="nan"):
        grad_reverse(torch.ones(2), float("nan"))


def test_domain_classifier_pools_globally_and_counts_parameters():
    torch.manual_seed(0)
    head = DomainClassifier(16, 3, hidden=32)
    # LayerNorm (weight + bias) + Linear + Linear
    assert sum(p.numel() for p in head.parameters()) == 2 * 16 + 16 * 32 + 32 + 32 * 3 + 3
    plain = DomainClassifier(16, 3, hidden=32, input_norm=False)
    assert sum(p.numel() for p in plain.parameters()) == 16 * 32 + 32 + 32 * 3 + 3
    x = torch.randn(2, 16, 3, 4, 5)
    logits = head(x)
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, head(x.mean(dim=(2, 3, 4))), rtol=1e-6, atol=1e-6)


def test_domain_classifier_logits_do_not_grow_with_the_feature_scale():
    # The encoder behind a GRL ascends the domain loss; with the input norm it cannot do so by
    # inflating its features, because the logits are invariant to the feature scale.
    torch.manual_seed(0)
    head = DomainClassifier(16, 3, hidden=32)
    x = torch.randn(4, 16, 3, 4, 5)
    torch.testing.assert_close(head(1000.0 * x), head(x), rtol=1e-4, atol=1e-4)
    plain = DomainClassifier(16, 3, hidden=32, input_norm=False)
    assert plain(1000.0 * x).abs().max() > 100 * plain(x).abs().max()


def test_domain_classifier_rejects_bad_arguments():
    with pytest.raises(ValueError, match="0"):
        DomainClassifier(16, 0)
    with pytest.raises(ValueError, match="1.0"):
        DomainClassifier(16, 3, dropout=1.0)


def test_dann_lambda_values():
    assert dann_lambda(0.0) == 0.0
    assert dann_lambda(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)  # 0.99991
    assert dann_lambda(0.5, lambda_max=0.1) == pytest.approx(0.1 * math.tanh(2.5))
    values = [dann_lambda(p / 20) for p in range(21)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert dann_lambda(-0.5) == 0.0 and dann_lambda(1.5) == dann_lambda(1.0)  # clipped
    with pytest.raises(ValueError, match="nan"):
        dann_lambda(float("nan"))
