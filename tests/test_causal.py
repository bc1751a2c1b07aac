"""Behaviour tests for vqkit.nn.causal: the training pass (2-D convolutions) computes the same
layer as the taps' matmul that the incremental samplers repeat, values and gradients."""

from __future__ import annotations

import pytest
import torch

from vqkit.nn.causal import CausalConv, pad_map


def _pass(conv: CausalConv, x: torch.Tensor, cotangent: torch.Tensor) -> list[torch.Tensor]:
    """The output and the gradients of x, the weight and the bias for one cotangent."""
    x = x.detach().requires_grad_()
    conv.zero_grad()
    y = conv(x)
    (y * cotangent).sum().backward()
    return [y.detach(), x.grad, conv.linear.weight.grad, conv.linear.bias.grad]


@pytest.mark.parametrize("rects, pad", [
    ([(-1, 1, -1, 2)], 1),                       # a gated PixelCNN's vertical stack, kernel 3
    ([(0, 1, -2, 0)], 2),                        # its first horizontal stack (mask A), kernel 5
    ([(-2, 0, -2, 3)], 2),                       # PixelSNAIL's rows strictly above
    ([(-2, 0, -2, 3), (0, 1, -2, 1)], 2),        # a masked 5x5 kernel: rows above, then the row to the left
])
def test_training_pass_equals_the_taps(rects, pad):
    torch.manual_seed(0)
    conv = CausalConv(6, 10, rects, pad)
    x = torch.randn(3, 7, 9, 6)
    cotangent = torch.randn(3, 7, 9, 10)
    trained = _pass(conv.train(), x, cotangent)   # 2-D convolutions
    taps = _pass(conv.eval(), x, cotangent)       # the taps' matmul, as row() and at() compute it
    for a, b in zip(trained, taps):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    # Causal: the output at a position does not move with any later position of the input.
    x2 = x.clone()
    x2[:, 4, 5:] += 1.0
    x2[:, 5:] += 1.0
    assert torch.equal(conv.train()(x2)[:, :4], conv(x)[:, :4])


def test_the_row_and_position_passes_reproduce_the_eval_pass():
    torch.manual_seed(0)
    conv = CausalConv(4, 8, [(-1, 1, -1, 2)], 1).eval()
    x = torch.randn(2, 5, 6, 4)
    full = conv(x)
    xp = pad_map(x, 1)
    assert torch.equal(conv.row(xp, 1 + 3), full[:, 3])
    assert torch.equal(conv.at(xp, 1 + 2, 1 + 4), full[:, 2, 4])
