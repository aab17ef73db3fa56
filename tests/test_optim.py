"""dgseg.training.optim: AdamW (dgseg default) vs Adam with coupled L2 decay and amsgrad (original
code)."""

import pytest
import torch

from dgseg.config import Config, OptimConfig, apply_overrides
from dgseg.training.optim import OPTIMIZERS, build_optimizer


def _one_step(cfg: OptimConfig) -> torch.Tensor:
    w = torch.nn.Parameter(torch.tensor([2.0, -3.0]))
    opt = build_optimizer([w], cfg)
    w.grad = torch.zeros_like(w)  # no loss gradient: only the weight decay acts
    opt.step()
    return w.detach()


def test_adamw_decays_decoupled_and_adam_couples_the_decay_to_the_gradient():
    lr, wd = 0.1, 0.01
    adamw = _one_step(OptimConfig(name="adamw", lr=lr, weight_decay=wd))
    # decoupled: θ(1 − lr·wd), and the zero gradient gives no Adam step
    torch.testing.assert_close(adamw, torch.tensor([2.0, -3.0]) * (1 - lr * wd))
    adam = _one_step(OptimConfig(name="adam", lr=lr, weight_decay=wd))
    # coupled (L2): g = wd·θ, and Adam's first step m̂/√v̂ = sign(g) moves every weight by lr
    torch.testing.assert_close(adam, torch.tensor([2.0 - lr, -3.0 + lr]), rtol=0, atol=1e-6)


def test_kinds_and_amsgrad():
    w = [torch.nn.Parameter(torch.ones(3))]
    assert type(build_optimizer(w, OptimConfig())) is torch.optim.AdamW
    opt = build_optimizer(
        w, apply_overrides(Config(), ["optim.name=adam", "optim.amsgrad=true"]).optim
    )
    assert type(opt) is torch.optim.Adam and opt.defaults["amsgrad"]
    assert opt.defaults["weight_decay"] == 1e-5 and opt.defaults["lr"] == 1e-4
    assert OPTIMIZERS == ("adamw", "adam")

    class Bad:
        name, lr, betas, weight_decay, amsgrad = "sgd", 0.1, (0.9, 0.99), 0.0, False

    with pytest.raises(ValueError, match="optim.name must be one of"):
        build_optimizer(w, Bad())
