"""dgseg.training.optim: the fused Adam/AdamW kernel (CPU too) takes the per-parameter loop's steps,
and the two read each other's state (a checkpoint of either resumes in the other)."""

import copy
import dataclasses

import pytest
import torch

from dgseg.config import OptimConfig
from dgseg.training.optim import build_optimizer, fused_supported


@pytest.mark.parametrize("name, amsgrad", [("adamw", False), ("adam", True)])
def test_fused_cpu_optimizer_takes_the_loops_steps(name, amsgrad):
    if not fused_supported("cpu"):
        pytest.skip("this torch has no fused CPU Adam")
    cfg = dataclasses.replace(OptimConfig(), name=name, amsgrad=amsgrad, lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    loop = [torch.nn.Parameter(torch.randn(40, 30, generator=g)), torch.nn.Parameter(torch.ones(7))]
    fused = [torch.nn.Parameter(p.detach().clone()) for p in loop]
    start = [p.detach().clone() for p in loop]
    opt_loop, opt_fused = build_optimizer(loop, cfg), build_optimizer(fused, cfg, fused=True)
    for step in range(12):
        if step == 6:  # resume the fused one from the loop's state
            opt_fused = build_optimizer(fused, cfg, fused=True)
            opt_fused.load_state_dict(copy.deepcopy(opt_loop.state_dict()))  # as from a file
        for a, b in zip(loop, fused):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt_loop.step()
        opt_fused.step()
    assert min((a - a0).abs().max() for a, a0 in zip(loop, start)) > 1e-2  # they moved
    for a, b in zip(loop, fused):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
