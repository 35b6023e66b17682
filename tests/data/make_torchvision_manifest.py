"""Write the reference state-dict manifest of torchvision's ResNets, made from torchvision's own source.

torchvision is not a dependency (and cannot be imported here), so this reads `torchvision/models/resnet.py` out of
the torchvision wheel, executes it with small stubs standing in for the torchvision-internal imports, builds
resnet18..152 on the meta device and records every state-dict key with its shape. It also records the URL of each
architecture's DEFAULT weights, which `models/pretrained.py` must match.

How the committed files were made (torchvision 0.29.1, the wheel pip finds on this machine):

    cd /tmp && /work/main/.venv/bin/pip download torchvision==0.29.1 --no-deps -d tvw
    .venv/bin/python tests/data/make_torchvision_manifest.py /tmp/tvw/torchvision-0.29.1-*.whl

Outputs, beside this script:
    torchvision_resnet_state_dict.json  {arch: {key: shape}}
    torchvision_resnet_weights.json     {arch: url of the DEFAULT weights}
"""

import argparse
import enum
import json
import re
import zipfile
from pathlib import Path
from types import SimpleNamespace

import torch

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
HERE = Path(__file__).resolve().parent
# resnet.py's imports from elsewhere in torchvision are all one-line relative imports.
RELATIVE_IMPORT = re.compile(r"^from \.[\w.]* import .*$", re.MULTILINE)
SHAPE_LIST = re.compile(r"\[[\d,\s]*\]")


class _WeightsEnum(enum.Enum):
    @classmethod
    def verify(cls, obj):
        return obj


def _decorator_factory(*args, **kwargs):
    return lambda fn: fn


def _overwrite_named_param(kwargs: dict, name: str, value) -> None:
    kwargs[name] = value


STUBS = {
    "ImageClassification": object,
    "_log_api_usage_once": lambda obj: None,
    "register_model": _decorator_factory,
    "handle_legacy_interface": _decorator_factory,
    "Weights": SimpleNamespace,
    "WeightsEnum": _WeightsEnum,
    "_IMAGENET_CATEGORIES": [f"class{i}" for i in range(1000)],
    "_ovewrite_named_param": _overwrite_named_param,
}


def load_resnet_module(wheel: Path) -> dict:
    """Execute torchvision's resnet.py from `wheel` with stubbed imports; returns its namespace."""
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read("torchvision/models/resnet.py").decode()
    namespace = {"__name__": "torchvision_resnet", **STUBS}
    exec(compile(RELATIVE_IMPORT.sub("", source), "torchvision/models/resnet.py", "exec"), namespace)
    return namespace


def _dump_one_key_a_line(state_dicts: dict) -> str:
    """JSON with one state-dict key and its shape on each line, so the file diffs and reads well."""
    text = json.dumps(state_dicts, indent=1)
    return SHAPE_LIST.sub(lambda match: "[" + ", ".join(re.findall(r"\d+", match.group(0))) + "]", text) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="torchvision wheel file")
    args = parser.parse_args()
    resnet = load_resnet_module(args.wheel)

    state_dicts = {}
    for arch in ARCHS:
        with torch.device("meta"):
            model = resnet[arch](weights=None)
        state_dicts[arch] = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    urls = {arch: resnet[f"ResNet{arch.removeprefix('resnet')}_Weights"].DEFAULT.value.url for arch in ARCHS}

    (HERE / "torchvision_resnet_state_dict.json").write_text(_dump_one_key_a_line(state_dicts))
    (HERE / "torchvision_resnet_weights.json").write_text(json.dumps(urls, indent=1) + "\n")


if __name__ == "__main__":
    main()
