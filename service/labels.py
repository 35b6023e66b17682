"""Class labels of a served model: ImageNet's (packaged with models/), a text file, or the class indices."""

from importlib import resources
from pathlib import Path


def load_labels(spec: str | None, num_classes: int) -> list[str]:
    """`num_classes` labels from `spec`: "imagenet", the path of a text file (one label a line), or None (indices).

    Raises ValueError when the file's label count differs from the model's class count, OSError when it is unreadable.
    """
    if spec is None:
        return [str(index) for index in range(num_classes)]
    if spec == "imagenet":
        text = resources.files("models").joinpath("imagenet_labels.txt").read_text(encoding="utf-8")
    else:
        text = Path(spec).read_text(encoding="utf-8")
    labels = text.rstrip("\n").split("\n")
    if len(labels) != num_classes:
        raise ValueError(f"labels {spec!r} has {len(labels)} lines but the model has {num_classes} classes")
    return labels
