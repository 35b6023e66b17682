"""`python -m service.client IMAGE... [--model] [--top-k] [--address]`: classify image files, print predictions.

Without --model it asks the server (ListModels) and uses the first model that is ready.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from service._proto import classifier_pb2, classifier_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.client",
        description="Classify images with a running server (resnet.v1.Classifier).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="JPEG, PNG, WebP or BMP files")
    parser.add_argument("--model", help="model name (ListModels shows them); default: the first ready one")
    parser.add_argument("--top-k", type=int, default=5, help="predictions per image")
    parser.add_argument("--address", default="localhost:50051", help="server host:port")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Prints `IMAGE: label (index) score` lines; returns 1 if any image failed."""
    args = build_parser().parse_args(argv)
    failed = False
    with grpc.insecure_channel(args.address) as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        try:
            model = args.model or _first_ready_model(stub, args.timeout)
        except (grpc.RpcError, LookupError) as error:
            print(f"no model to ask: {_describe(error)}", file=sys.stderr)
            return 1
        for path in args.images:
            try:
                request = classifier_pb2.ClassifyRequest(model=model, image=path.read_bytes(), top_k=args.top_k)
                response = stub.Classify(request, timeout=args.timeout)
            except OSError as error:
                print(f"{path}: cannot read: {error}", file=sys.stderr)
                failed = True
                continue
            except grpc.RpcError as error:
                print(f"{path}: {_describe(error)}", file=sys.stderr)
                failed = True
                continue
            print(f"{path}: {response.model}, batch of {response.batch_size}, {response.compute_us} us compute")
            for prediction in response.predictions:
                print(f"  {prediction.score:8.4f}  {prediction.label} ({prediction.index})")
    return 1 if failed else 0


def _first_ready_model(stub: classifier_pb2_grpc.ClassifierStub, timeout: float) -> str:
    """The first ready model the server lists; LookupError when none is."""
    listed = stub.ListModels(classifier_pb2.ListModelsRequest(), timeout=timeout).models
    ready = [info.name for info in listed if info.ready]
    if not ready:
        reasons = "; ".join(f"{info.name}: {info.reason}" for info in listed) or "the repository is empty"
        raise LookupError(f"no model is ready ({reasons})")
    return ready[0]


def _describe(error: grpc.RpcError | LookupError) -> str:
    if isinstance(error, grpc.RpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error)


if __name__ == "__main__":
    sys.exit(main())
