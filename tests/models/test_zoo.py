"""The eager models: torchvision compatibility, build() contract, random init, weights loading, digits data path."""

import hashlib
import io
import json
import re
import shutil
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from models import digits, pretrained, train_digits
from models.zoo import MODEL_NAMES, build

DATA = Path(__file__).resolve().parents[1] / "data"
TORCHVISION_STATE_DICTS = json.loads((DATA / "torchvision_resnet_state_dict.json").read_text())
TORCHVISION_URLS = json.loads((DATA / "torchvision_resnet_weights.json").read_text())


@pytest.fixture(scope="module")
def random_model():
    """build(name) with the default seed, built once per module: the deep ones take a while. Read-only use."""
    models: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in models:
            models[name] = build(name)
        return models[name]

    yield get
    models.clear()


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key, tensor in state_a.items():
        assert torch.equal(tensor, state_b[key]), key


@pytest.mark.parametrize("arch", sorted(TORCHVISION_STATE_DICTS))
def test_state_dict_matches_torchvision(arch, random_model):
    model = random_model(arch)
    shapes = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    assert list(shapes.items()) == list(TORCHVISION_STATE_DICTS[arch].items())

    # A checkpoint with exactly torchvision's keys and shapes loads strictly (on the meta device: no memory needed).
    with torch.device("meta"):
        shell = type(model)(model.config)
        checkpoint = {key: torch.empty(shape) for key, shape in TORCHVISION_STATE_DICTS[arch].items()}
    shell.load_state_dict(checkpoint, strict=True, assign=True)


def test_published_checkpoints_are_torchvisions_default_weights():
    assert pretrained.URLS == TORCHVISION_URLS


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_build_gives_eval_model_with_logits_for_odd_batch_and_non_square_input(name, random_model):
    model = random_model(name)
    assert not any(module.training for module in model.modules())
    with torch.no_grad():
        logits = model(torch.randn(3, 3, 40, 56))
    assert logits.shape == (3, 10 if name == "digits_resnet" else 1000)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1  # the input reaches the logits


@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18", "digits_resnet"])
def test_num_classes_sets_the_classifier_width(name):
    with torch.no_grad():
        assert build(name, num_classes=7)(torch.randn(1, 3, 33, 35)).shape == (1, 7)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_random_batchnorm_parameters_are_far_from_trivial(name, random_model):
    batchnorms = [module for module in random_model(name).modules() if isinstance(module, nn.BatchNorm2d)]
    assert batchnorms
    for bn in batchnorms:
        assert (bn.running_var - 1).abs().mean() > 0.2
        assert bn.running_var.min() > 0.4
        assert bn.running_mean.abs().mean() > 0.05
        assert (bn.weight - 1).abs().mean() > 0.1
        assert bn.bias.abs().mean() > 0.01


@pytest.mark.parametrize("name", ["resnet152", "preact_resnet50"])
def test_random_activations_stay_in_float16_range(name, random_model):
    """Random weights keep every activation O(1) even 50 blocks deep, so float16 runs of them cannot overflow."""
    model = random_model(name)
    largest: dict[str, float] = {}

    def record(module_name):
        return lambda module, inputs, output: largest.__setitem__(module_name, output.abs().max().item())

    hooks = [
        module.register_forward_hook(record(module_name))
        for module_name, module in model.named_modules()
        if not list(module.children())
    ]
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 160, 160))
    for hook in hooks:
        hook.remove()
    assert max(largest.values()) < 1000, max(largest.items(), key=lambda item: item[1])
    assert 0.5 < logits.std() < 100


def test_same_seed_same_weights_other_seed_other_weights():
    _assert_same_state(build("resnet18", seed=5), build("resnet18", seed=5))
    first, other = build("resnet18", seed=5).state_dict(), build("resnet18", seed=6).state_dict()
    for key, tensor in first.items():
        if tensor.is_floating_point():
            assert not torch.equal(tensor, other[key]), key


def test_build_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build("preact_resnet18", seed=9)
    assert torch.equal(torch.rand(4), expected)


def test_weights_file_round_trip(tmp_path):
    model = build("digits_resnet", seed=3)
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    x = torch.randn(2, 3, 48, 40)
    for weights in (path, str(path)):
        loaded = build("digits_resnet", weights=weights)
        _assert_same_state(model, loaded)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"resnet51.*known models: resnet18, resnet34, resnet50"):
        build("resnet51")


def test_missing_weights_file_is_named(tmp_path):
    path = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        build("resnet18", weights=path)


@pytest.mark.parametrize(
    ("saved", "target", "message"),
    [
        (("resnet18", None), ("resnet34", None), "Missing key"),
        (("resnet34", None), ("resnet18", None), "Unexpected key"),
        (("digits_resnet", 10), ("digits_resnet", 7), "size mismatch"),
    ],
)
def test_weights_that_do_not_fit_are_a_clear_error(tmp_path, saved, target, message):
    path = tmp_path / "weights.pt"
    torch.save(build(saved[0], num_classes=saved[1]).state_dict(), path)
    with pytest.raises(ValueError, match=f"(?s){re.escape(str(path))}.*{message}"):
        build(target[0], weights=path, num_classes=target[1])


def test_weights_file_without_a_state_dict_is_a_clear_error(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.randn(3), path)
    with pytest.raises(ValueError, match="not a state dict"):
        build("digits_resnet", weights=path)


def test_preact_has_no_published_weights():
    with pytest.raises(ValueError, match="no published weights"):
        build("preact_resnet50", weights="pretrained")


def test_pretrained_with_other_num_classes_is_refused():
    with pytest.raises(ValueError, match="1000 classes"):
        build("resnet18", weights="pretrained", num_classes=10)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache that the network must not be needed for (downloads fail the test)."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def no_network(*args, **kwargs):
        pytest.fail("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


def _publish(state_dict: dict, arch: str, directory: Path, monkeypatch) -> Path:
    """Save `state_dict` under torchvision's naming (sha256 prefix in the name) and point URLS[arch] at it."""
    staging = directory / "staging.pth"
    torch.save(state_dict, staging)
    prefix = hashlib.sha256(staging.read_bytes()).hexdigest()[:8]
    published = directory / f"{arch}-{prefix}.pth"
    staging.rename(published)
    monkeypatch.setitem(pretrained.URLS, arch, f"https://example.invalid/models/{published.name}")
    return published


def _cache(published: Path, hub: Path) -> Path:
    cached = hub / "checkpoints" / published.name
    cached.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(published, cached)
    return cached


def test_pretrained_loads_the_verified_cached_checkpoint(hub_dir, tmp_path_factory, monkeypatch):
    source = build("resnet18", seed=11)
    _cache(_publish(source.state_dict(), "resnet18", tmp_path_factory.mktemp("server"), monkeypatch), hub_dir)
    _assert_same_state(build("resnet18", weights="pretrained"), source)


def test_pretrained_rejects_a_corrupt_cached_file(hub_dir, tmp_path_factory, monkeypatch):
    published = _publish({"w": torch.randn(8)}, "resnet34", tmp_path_factory.mktemp("server"), monkeypatch)
    cached = _cache(published, hub_dir)
    cached.write_bytes(cached.read_bytes()[:-1])
    with pytest.raises(pretrained.WeightsUnavailableError, match=f"{re.escape(str(cached))} is corrupt"):
        pretrained.load_state_dict("resnet34")


def test_pretrained_downloads_into_the_cache_when_missing(hub_dir, tmp_path_factory, monkeypatch):
    state = {"w": torch.randn(8)}
    published = _publish(state, "resnet50", tmp_path_factory.mktemp("server"), monkeypatch)
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        shutil.copyfile(published, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    assert torch.equal(pretrained.load_state_dict("resnet50")["w"], state["w"])
    cached = hub_dir / "checkpoints" / published.name
    assert calls == [(pretrained.URLS["resnet50"], str(cached), published.stem.split("-")[1])]
    assert torch.equal(pretrained.load_state_dict("resnet50")["w"], state["w"])  # now from the cache
    assert len(calls) == 1


def test_pretrained_offline_and_uncached_says_where_to_put_the_file(hub_dir, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    url = pretrained.URLS["resnet101"]
    with pytest.raises(RuntimeError) as raised:
        build("resnet101", weights="pretrained")
    assert isinstance(raised.value, pretrained.WeightsUnavailableError)
    message = str(raised.value)
    assert url.rsplit("/", 1)[1] in message
    assert url in message
    assert str(hub_dir / "checkpoints") in message


def test_digits_split_is_fixed_and_stratified():
    train, test = digits.load_split()
    again_train, again_test = digits.load_split()
    assert np.array_equal(train.images, again_train.images)
    assert np.array_equal(test.labels, again_test.labels)
    assert train.images.shape == (1437, 8, 8)
    assert test.images.shape == (360, 8, 8)
    assert train.images.dtype == np.uint8
    assert train.images.max() == 255
    assert set(np.bincount(test.labels)) <= {35, 36, 37}


def test_digits_png_and_preprocess():
    _, test = digits.load_split()
    image = test.images[0]
    decoded = Image.open(io.BytesIO(digits.to_png(image)))
    assert np.array_equal(np.asarray(decoded), image)

    tensor = digits.preprocess(decoded)
    assert tensor.shape == (3, 32, 32)
    assert tensor.dtype == torch.float32
    assert torch.equal(tensor[0], tensor[1])
    assert torch.equal(tensor[0], tensor[2])
    # A colour upload of the same scan is served exactly as the grayscale one.
    assert torch.equal(digits.preprocess(decoded.convert("RGB")), tensor)
    assert torch.equal(digits.preprocess_images(test.images[:1])[0], tensor)


def test_committed_digits_weights_reach_97_percent_held_out():
    """The shipped model, fed the way the service feeds it (PNG bytes -> preprocess), on the held-out scans."""
    _, test = digits.load_split()
    inputs = torch.stack([digits.preprocess(Image.open(io.BytesIO(digits.to_png(image)))) for image in test.images])
    model = build("digits_resnet", weights="pretrained")
    with torch.no_grad():
        predictions = model(inputs).argmax(dim=1)
    accuracy = (predictions == torch.from_numpy(test.labels)).float().mean().item()
    assert accuracy >= 0.97


def test_random_shift_translates_within_bounds_and_fills_with_background():
    batch = torch.randn(6, 3, 32, 32)
    generator = torch.Generator().manual_seed(0)
    shifted = train_digits.random_shift(batch, generator)
    assert shifted.shape == batch.shape
    reach = train_digits.MAX_SHIFT
    padded = torch.nn.functional.pad(batch, [reach] * 4, value=-digits.MEAN / digits.STD)
    windows = {
        (dy, dx): padded[:, :, dy : dy + 32, dx : dx + 32] for dy in range(2 * reach + 1) for dx in range(2 * reach + 1)
    }
    offsets = [
        [key for key, window in windows.items() if torch.equal(window[i], shifted[i])] for i in range(len(batch))
    ]
    assert all(len(found) == 1 for found in offsets)
    assert len({found[0] for found in offsets}) > 1  # not one shift for the whole batch


def test_fit_lowers_the_training_loss():
    train, _ = digits.load_split()
    model = build("digits_resnet")
    images, labels = digits.preprocess_images(train.images[:64]), torch.from_numpy(train.labels[:64])
    losses = train_digits.fit(model, images, labels, epochs=12, generator=torch.Generator().manual_seed(0))
    assert len(losses) == 12
    assert losses[-1] < 0.95 * losses[0]
