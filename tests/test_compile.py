"""run.compile: a torch.compile'd training step gives the eager step's loss (bf16 tolerance).

dgseg's CPU kernel paths (dgseg.layers.conv, dgseg.layers.gn_relu) step aside while compiling, so
the compiler traces ordinary convolutions and GroupNorm; the losses must agree either way.
"""

import shutil

import pytest
import torch

from dgseg.models import build_model
from dgseg.training.losses import SegLoss

needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None and shutil.which("gcc") is None,
    reason="torch.compile on the CPU needs a C++ compiler",
)


def _two_steps(compiled: bool, channels_last: bool) -> list[float]:
    torch.manual_seed(0)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    net = build_model(1, init_filters=4, blocks_down=(1, 1, 1), blocks_up=(1, 1), grl=True)
    net = net.to(memory_format=fmt)
    model = torch.compile(net) if compiled else net
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 1, 16, 16, 16, generator=g).contiguous(memory_format=fmt)
    y = (torch.randn(1, 3, 16, 16, 16, generator=g) > 0.5).float()
    d = torch.tensor([1])
    losses = []
    for _ in range(2):
        seg, dom = model(x, grl_lambda=0.5)
        loss = SegLoss(bce_weight=1.0)(seg, y) + torch.nn.functional.cross_entropy(dom.float(), d)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@needs_compiler
def test_compiled_and_eager_steps_give_the_same_loss():
    torch._dynamo.reset()
    eager = _two_steps(False, channels_last=True)  # the CPU default for large maps
    compiled = _two_steps(True, channels_last=True)
    # bf16 tolerance (8 mantissa bits): the compiled graph may reorder float32 reductions.
    assert compiled == pytest.approx(eager, rel=2**-8)
