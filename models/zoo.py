"""The model registry: `build(name, weights, seed, num_classes)` for every architecture by name, with random, published
or file weights, and `input_spec(name, input_size)`, how each one's input is prepared from an image.

Random weights are meant for parity tests of the fused model, so they exercise what BatchNorm folding gets wrong:
every BatchNorm has running statistics and affine parameters well away from the trivial 0/1. They also keep
activations O(1) through the deepest model, so float16 runs never overflow (see `init_random`).
"""

import errno
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from models import digits, preact_resnet, pretrained, resnet
from models.inputs import InputSpec, imagenet_input
from models.preact_resnet import PreActBasicBlock, PreActBottleneck, PreActResNet
from models.resnet import BasicBlock, Bottleneck, ResNet

_ARCHITECTURES: dict[str, tuple[type[nn.Module], resnet.ResNetConfig]] = {
    **{name: (ResNet, config) for name, config in resnet.CONFIGS.items()},
    **{name: (PreActResNet, config) for name, config in preact_resnet.CONFIGS.items()},
}
MODEL_NAMES: tuple[str, ...] = tuple(_ARCHITECTURES)

# Trained weights shipped in the package (models/train_digits.py makes them).
COMMITTED_WEIGHTS: dict[str, Path] = {"digits_resnet": Path(__file__).resolve().parent / "weights" / "digits_resnet.pt"}

# The last layer of each residual branch. Its parameters are scaled down at random init, so each block adds a little
# to the residual stream instead of doubling it: resnet152 stacks 50 blocks (the idea of torchvision's
# zero_init_residual, but nonzero so the branch is still tested).
_BRANCH_TAILS: dict[type[nn.Module], str] = {
    BasicBlock: "bn2",
    Bottleneck: "bn3",
    PreActBasicBlock: "conv2",
    PreActBottleneck: "conv3",
}
_BRANCH_TAIL_SCALE = 0.2

# Models trained here on their own data take that data's recipe at the size they were trained at; every other model
# takes ImageNet's at any size.
_FIXED_INPUTS: dict[str, InputSpec] = {"digits_resnet": digits.INPUT}


def build(name: str, weights: str | os.PathLike = "random", seed: int = 0, num_classes: int | None = None) -> nn.Module:
    """Model `name` (one of MODEL_NAMES) in eval mode, on the CPU, taking [N, 3, H, W] and giving [N, num_classes].

    weights: "random" (init_random with `seed`), "pretrained" (torchvision's ImageNet checkpoint for resnet18–152,
    the committed trained weights for digits_resnet), or the path of a state-dict file (loaded strictly).
    num_classes: defaults to the architecture's (1000; 10 for digits_resnet).
    Raises ValueError for an unknown name, weights that do not fit, or a pretrained model with other num_classes;
    FileNotFoundError for a missing weights file; pretrained.WeightsUnavailableError when a published checkpoint can
    be neither found nor downloaded.
    """
    if name not in _ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    model_class, config = _ARCHITECTURES[name]
    if weights == "pretrained" and num_classes not in (None, config.num_classes):
        raise ValueError(f"pretrained {name} has {config.num_classes} classes, not {num_classes}")
    if num_classes is not None:
        config = replace(config, num_classes=num_classes)

    # Built without storage, then filled once: PyTorch's default init would draw on the global RNG and be overwritten.
    with torch.device("meta"):
        model = model_class(config)
    model.to_empty(device="cpu")
    if weights == "random":
        init_random(model, seed)
    elif weights == "pretrained":
        _load_state_dict(model, _pretrained_state_dict(name), f"pretrained weights of {name}")
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                errno.ENOENT, "no such weights file (weights: 'random', 'pretrained' or a state-dict path)", str(path)
            )
        _load_state_dict(model, torch.load(path, map_location="cpu", weights_only=True), str(path))
    return model.eval()


def input_spec(name: str, input_size: int) -> InputSpec:
    """How model `name` (one of MODEL_NAMES) served at `input_size` takes an image; ValueError for an unknown name or
    a size the model was not trained at."""
    if name not in _ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    fixed = _FIXED_INPUTS.get(name)
    if fixed is None:
        return imagenet_input(input_size)
    if input_size != fixed.input_size:
        raise ValueError(f"{name} takes {fixed.input_size}x{fixed.input_size} inputs, not {input_size}")
    return fixed


@torch.no_grad()
def init_random(model: nn.Module, seed: int) -> None:
    """Fill every parameter and buffer of `model` from a torch.Generator seeded with `seed` (global RNG untouched).

    Convolutions: He normal over fan-in, which keeps a ReLU network's activations at unit scale. BatchNorm:
    gamma ~ U(0.5, 1.5), beta ~ U(-0.25, 0.25), running_mean ~ U(-0.25, 0.25), running_var ~ U(0.5, 2); on average the
    eval-mode BN then keeps the scale of its input. Linear: weight ~ N(0, 1/fan_in), bias ~ U(-0.1, 0.1). The last
    layer of each residual branch is then scaled by _BRANCH_TAIL_SCALE.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu", generator=generator)
        elif isinstance(module, nn.BatchNorm2d):
            # Every BatchNorm here tracks running statistics (the default), so these buffers exist.
            assert module.running_mean is not None and module.running_var is not None
            assert module.num_batches_tracked is not None
            module.weight.uniform_(0.5, 1.5, generator=generator)
            module.bias.uniform_(-0.25, 0.25, generator=generator)
            module.running_mean.uniform_(-0.25, 0.25, generator=generator)
            module.running_var.uniform_(0.5, 2.0, generator=generator)
            module.num_batches_tracked.zero_()
        elif isinstance(module, nn.Linear):
            module.weight.normal_(0.0, module.in_features**-0.5, generator=generator)
            module.bias.uniform_(-0.1, 0.1, generator=generator)
        elif any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            raise TypeError(f"init_random does not know how to fill {type(module).__name__}")
    # A second pass: modules() visits a block before its layers, which the first pass would refill.
    for module in model.modules():
        tail = _BRANCH_TAILS.get(type(module))
        if tail is not None:
            for parameter in getattr(module, tail).parameters():
                parameter.mul_(_BRANCH_TAIL_SCALE)


def _pretrained_state_dict(name: str) -> Mapping[str, torch.Tensor]:
    if name in pretrained.URLS:
        return pretrained.load_state_dict(name)
    if name in COMMITTED_WEIGHTS:
        return torch.load(COMMITTED_WEIGHTS[name], map_location="cpu", weights_only=True)
    raise ValueError(f"{name} has no published weights; use weights='random' or the path of a state-dict file")


def _load_state_dict(model: nn.Module, state_dict: object, source: str) -> None:
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{source} is not a state dict but a {type(state_dict).__name__}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:  # torch lists the missing, unexpected and mis-shaped keys
        raise ValueError(f"{source} does not fit {type(model).__name__}({model.config}): {error}") from error
