"""torchvision's published ImageNet checkpoints for resnet18–152: from torch hub's cache, or downloaded into it.

The hub cache is the directory torchvision itself uses (`torch.hub.get_dir()/checkpoints`), so a checkpoint already
fetched by torchvision is found here. Every load checks the file's sha256 against the prefix in its name (torchvision's
convention), cached files included: a truncated or swapped file fails loudly instead of serving wrong answers.
"""

import hashlib
import logging
from pathlib import Path
from urllib.parse import urlparse

import torch

logger = logging.getLogger(__name__)

# The DEFAULT weights of torchvision 0.29.1 (IMAGENET1K_V2 where it exists, else IMAGENET1K_V1); the 8 hex digits in
# each file name are the start of its sha256. tests/data/torchvision_resnet_weights.json holds the same, from source.
URLS: dict[str, str] = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-cd907fc2.pth",
    "resnet152": "https://download.pytorch.org/models/resnet152-f82ba261.pth",
}
_HASH_CHUNK_BYTES = 1 << 20


class WeightsUnavailableError(RuntimeError):
    """A published checkpoint is neither in the cache (intact) nor downloadable."""


def checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def load_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """The verified published state dict of `arch` (one of URLS), on the CPU."""
    return torch.load(checkpoint_path(arch), map_location="cpu", weights_only=True)


def checkpoint_path(arch: str) -> Path:
    """Path of the verified checkpoint of `arch`, downloading it into the hub cache when it is not there."""
    url = URLS[arch]
    file_name = Path(urlparse(url).path).name
    expected_prefix = _hash_prefix(file_name)
    path = checkpoint_dir() / file_name
    if not path.is_file():
        _download(url, path, expected_prefix)
    digest = _sha256(path)
    if not digest.startswith(expected_prefix):
        raise WeightsUnavailableError(
            f"{path} is corrupt: its sha256 {digest} does not start with {expected_prefix}. "
            f"Delete it to download it again from {url}, or replace it with an intact copy."
        )
    return path


def _hash_prefix(file_name: str) -> str:
    # "resnet50-11ad3fa6.pth" -> "11ad3fa6"
    return Path(file_name).stem.rsplit("-", 1)[1]


def _download(url: str, path: Path, expected_prefix: str) -> None:
    logger.info("downloading %s to %s", url, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=expected_prefix, progress=False)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a hash mismatch is a RuntimeError
        raise WeightsUnavailableError(
            f"{path.name} is not cached and could not be downloaded from {url} ({error}). "
            f"Fetch it where the network is reachable and put it in {path.parent}."
        ) from error


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
