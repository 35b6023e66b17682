"""Train digits_resnet on the digits training split, on the CPU, deterministically; report held-out accuracy.

Usage: python -m models.train_digits [--out models/weights/digits_resnet.pt] [--epochs 30] [--seed 0]
"""

import argparse
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models import digits
from models.zoo import COMMITTED_WEIGHTS, build

logger = logging.getLogger(__name__)

BATCH_SIZE = 64
MAX_SHIFT = 3  # pixels at 32x32, i.e. under one pixel of the 8x8 scan: the writers' own jitter


def random_shift(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of [N, C, H, W] by up to MAX_SHIFT pixels, filling with the background value."""
    background = -digits.MEAN / digits.STD
    padded = F.pad(batch, [MAX_SHIFT] * 4, value=background)
    size = batch.shape[-1]
    offsets = torch.randint(0, 2 * MAX_SHIFT + 1, (len(batch), 2), generator=generator).tolist()
    crops = [image[:, dy : dy + size, dx : dx + size] for image, (dy, dx) in zip(padded, offsets, strict=True)]
    return torch.stack(crops)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of `model` in eval mode on [N, 3, 32, 32] images."""
    model.eval()
    return (model(images).argmax(dim=1) == labels).float().mean().item()


def fit(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int, generator: torch.Generator
) -> list[float]:
    """Train `model` in place on [N, 3, 32, 32] images (SGD, one-cycle schedule); the mean loss of each epoch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = -(-len(images) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=epochs * steps_per_epoch)
    epoch_losses = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        total_loss = 0.0
        for batch_indices in order.split(BATCH_SIZE):
            inputs = random_shift(images[batch_indices], generator)
            loss = F.cross_entropy(model(inputs), labels[batch_indices])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch_indices)
        epoch_losses.append(total_loss / len(images))
        logger.info("epoch %d/%d: training loss %.4f", epoch + 1, epochs, epoch_losses[-1])
    return epoch_losses


def train(epochs: int, seed: int) -> tuple[nn.Module, float]:
    """digits_resnet trained on the training split (eval mode), and its accuracy on the held-out split."""
    generator = torch.Generator().manual_seed(seed)
    train_split, test_split = digits.load_split()
    model = build("digits_resnet", seed=seed)
    fit(model, digits.preprocess_images(train_split.images), torch.from_numpy(train_split.labels), epochs, generator)
    test_accuracy = accuracy(model, digits.preprocess_images(test_split.images), torch.from_numpy(test_split.labels))
    return model, test_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=COMMITTED_WEIGHTS["digits_resnet"])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # One thread: the machines this runs on are shared, and the result then does not depend on their core count.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)  # every draw here uses its own generator; this pins any that might not

    start = time.perf_counter()
    model, test_accuracy = train(args.epochs, args.seed)
    logger.info("held-out accuracy %.4f after %.0f s of training", test_accuracy, time.perf_counter() - start)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    logger.info("saved %s (%d bytes)", args.out, args.out.stat().st_size)


if __name__ == "__main__":
    main()
