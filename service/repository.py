"""The model repository (docs/ARCHITECTURE.md contract 5): a TOML file with one `[models.NAME]` table per served model.

This is the boundary where the file's strings become typed values, once: `load_repository` returns validated
`ModelConfig` entries, and nothing past it parses a repository string again. Parsing checks names, types and ranges
only, so a typo stops the server at start with a message naming the file, the table and the key. Whatever needs
files or the network (weights, label files) is left to loading, where a failure marks just that model not ready.
Relative paths are relative to the TOML file. `required = true` marks a model the server is not ready without.
"""

import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import models
from models.precision import FLOAT32, PRECISIONS, Precision, parse_precision
from service.backends.base import AUTO_BACKEND, BACKEND_CHOICES
from service.batch_plan import BucketPolicy
from service.input_layout import AdvertisedInput

T = TypeVar("T")

DEFAULT_REPOSITORY = Path(str(resources.files("service").joinpath("default_repository.toml")))
BUILTIN_LABELS = ("imagenet",)
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class RepositoryError(ValueError):
    """The repository file is missing, not TOML, or describes a model wrongly."""


@dataclass(frozen=True)
class ModelConfig:
    """One served model, as validated from its repository table. `backend` and `max_queue_size` default to the
    server's flags when None. `precision` is the table's `dtype`: float16, bfloat16 (eager or fused on a GPU) and tf32
    (fused on a GPU) besides float32."""

    name: str
    arch: str
    weights: str = "pretrained"  # "pretrained" | "random" | absolute path of a state-dict file
    labels: str | None = None  # "imagenet" | absolute path of a text file | None: labels are the class indices
    input_size: int = 224
    max_batch_size: int = 32
    max_queue_delay_us: int = 2000
    num_classes: int | None = None
    seed: int = 0
    backend: str | None = None  # one of BACKEND_CHOICES
    max_queue_size: int | None = None
    precision: Precision = FLOAT32
    bucket_policy: BucketPolicy = BucketPolicy.COST  # where batches close among the backend's graph buckets
    # The input layout ModelMetadata/ModelConfig advertise; ModelInfer accepts both layouts whatever it is.
    advertised_input: AdvertisedInput = AdvertisedInput.FP32_NCHW
    required: bool = False  # the server is not ready (health NOT_SERVING) unless this model is


_STRING_KEYS = {"arch", "weights", "labels", "backend", "dtype", "bucket_policy", "advertised_input"}
_INT_MINIMUMS = {
    "input_size": 1,
    "max_batch_size": 1,
    "max_queue_delay_us": 0,
    "num_classes": 1,
    "seed": 0,
    "max_queue_size": 1,
}
_BOOL_KEYS = {"required"}
_KNOWN_KEYS = _STRING_KEYS | _BOOL_KEYS | set(_INT_MINIMUMS)


def load_repository(path: Path) -> list[ModelConfig]:
    """The models of the repository file at `path`, in file order. Raises RepositoryError."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise RepositoryError(f"cannot read model repository {path}: {error}") from error
    except tomllib.TOMLDecodeError as error:
        raise RepositoryError(f"model repository {path} is not valid TOML: {error}") from error
    extra = set(document) - {"models"}
    if extra:
        raise RepositoryError(f"{path}: unknown top-level keys {sorted(extra)}; models go in [models.NAME] tables")
    tables = document.get("models", {})
    if not isinstance(tables, dict) or not tables:
        raise RepositoryError(f"{path}: no models; add at least one [models.NAME] table")
    return [_parse_model(name, table, path) for name, table in tables.items()]


def _parse_model(name: str, table: object, path: Path) -> ModelConfig:
    where = f"{path}: [models.{name}]"
    base_dir = path.parent
    if not _NAME_PATTERN.fullmatch(name):
        raise RepositoryError(f"{where}: a model name is 1-64 letters, digits, '_', '.', '-', starting alphanumeric")
    if not isinstance(table, dict):
        raise RepositoryError(f"{where} must be a table")
    unknown = set(table) - _KNOWN_KEYS
    if unknown:
        raise RepositoryError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(_KNOWN_KEYS)}")
    if "arch" not in table:
        raise RepositoryError(f"{where}: 'arch' is required (one of {', '.join(models.MODEL_NAMES)})")
    for key, value in table.items():
        if key in _STRING_KEYS:
            if not isinstance(value, str):
                raise RepositoryError(f"{where}: {key} must be a string, got {value!r}")
        elif key in _BOOL_KEYS:
            if not isinstance(value, bool):
                raise RepositoryError(f"{where}: {key} must be true or false, got {value!r}")
        elif type(value) is not int or value < _INT_MINIMUMS[key]:  # type(): TOML booleans are not sizes
            raise RepositoryError(f"{where}: {key} must be an integer >= {_INT_MINIMUMS[key]}, got {value!r}")
    if table["arch"] not in models.MODEL_NAMES:
        raise RepositoryError(f"{where}: unknown arch {table['arch']!r}; known: {', '.join(models.MODEL_NAMES)}")
    if table.get("backend", AUTO_BACKEND) not in BACKEND_CHOICES:
        raise RepositoryError(f"{where}: backend must be one of {', '.join(BACKEND_CHOICES)}, got {table['backend']!r}")

    values = dict(table)
    precision = _parsed(values, "dtype", parse_precision, FLOAT32.name, PRECISIONS, where)
    bucket_policy = _parsed(values, "bucket_policy", BucketPolicy, BucketPolicy.COST, BucketPolicy, where)
    advertised_input = _parsed(
        values, "advertised_input", AdvertisedInput, AdvertisedInput.FP32_NCHW, AdvertisedInput, where
    )
    if values.get("weights", "pretrained") not in ("pretrained", "random"):
        values["weights"] = str(base_dir / values["weights"])
    if values.get("labels") is not None and values["labels"] not in BUILTIN_LABELS:
        values["labels"] = str(base_dir / values["labels"])
    return ModelConfig(
        name=name, precision=precision, bucket_policy=bucket_policy, advertised_input=advertised_input, **values
    )


def _parsed(
    values: dict[str, Any], key: str, parse: Callable[[Any], T], default: str, choices: Iterable[str], where: str
) -> T:
    """values[key] (taken out of `values`), or `default`, through `parse`; a RepositoryError naming the key, its
    choices and the value when `parse` refuses it."""
    raw = values.pop(key, default)
    try:
        return parse(raw)
    except ValueError:
        raise RepositoryError(f"{where}: {key} must be one of {', '.join(choices)}, got {raw!r}") from None
