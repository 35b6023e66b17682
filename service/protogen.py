"""Regenerates the committed gRPC stubs in service/_proto/ from proto/*.proto: `python -m service.protogen`.

The .proto files are the source of truth. protoc sees them under the virtual path service/_proto/, so the generated
modules import each other as `service._proto.x_pb2` and work from any working directory. Needs grpcio-tools (a
test dependency; the server itself only needs the committed stubs).
"""

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = REPO_ROOT / "proto"
STUB_PACKAGE_PATH = "service/_proto"


def generate(out_root: Path = REPO_ROOT) -> list[Path]:
    """Writes the stubs of every proto/*.proto under out_root/service/_proto/; returns the files written."""
    from grpc_tools import protoc  # imported here: a development tool, absent from a runtime-only install

    protos = sorted(PROTO_DIR.glob("*.proto"))
    out_dir = out_root / STUB_PACKAGE_PATH
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={STUB_PACKAGE_PATH}={PROTO_DIR}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(f"{STUB_PACKAGE_PATH}/{proto.name}" for proto in protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {[p.name for p in protos]}")
    return sorted(path for path in out_dir.iterdir() if path.suffix in (".py", ".pyi") and path.name != "__init__.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-root", type=Path, default=REPO_ROOT, help="write under OUT_ROOT/service/_proto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in generate(args.out_root):
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
