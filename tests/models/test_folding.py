"""BatchNorm folding in float64, checked against eager conv -> BN (no kernels involved)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.folding import bn_scale_shift, fold_conv_bn


def _random_bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels).double().eval()
    with torch.no_grad():
        bn.running_mean.normal_(0.0, 0.5)
        bn.running_var.uniform_(0.3, 3.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0.0, 0.5)
    return bn


@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize(("kernel", "stride", "padding"), [(1, 1, 0), (3, 2, 1), (7, 2, 3)])
def test_fold_conv_bn_matches_eager(conv_bias, kernel, stride, padding):
    conv = nn.Conv2d(5, 7, kernel, stride=stride, padding=padding, bias=conv_bias).double()
    bn = _random_bn(7)
    x = torch.randn(3, 5, 11, 9, dtype=torch.float64)
    weight, bias = fold_conv_bn(conv, bn)
    folded = F.conv2d(x, weight, bias, stride=stride, padding=padding)
    torch.testing.assert_close(folded, bn(conv(x)), rtol=1e-12, atol=1e-12)


def test_bn_scale_shift_is_the_eval_affine_map():
    bn = _random_bn(6)
    x = torch.randn(2, 6, 5, 4, dtype=torch.float64)
    scale, shift = bn_scale_shift(bn)
    torch.testing.assert_close(x * scale[:, None, None] + shift[:, None, None], bn(x), rtol=1e-12, atol=1e-12)


def test_fold_without_bn_keeps_the_conv():
    conv = nn.Conv2d(3, 4, 3, bias=False)
    weight, bias = fold_conv_bn(conv, None)
    torch.testing.assert_close(weight, conv.weight.double())
    assert torch.count_nonzero(bias) == 0


def test_fold_rejects_what_it_cannot_fold():
    with pytest.raises(ValueError, match="groups"):
        fold_conv_bn(nn.Conv2d(4, 4, 3, groups=2), None)
    with pytest.raises(ValueError, match="channels"):
        fold_conv_bn(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(5))
    with pytest.raises(ValueError, match="running statistics"):
        bn_scale_shift(nn.BatchNorm2d(4, track_running_stats=False))
