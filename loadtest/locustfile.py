"""Locust gRPC users for the ResNet service: `locust -f loadtest/locustfile.py --host 127.0.0.1:50051`.

Written the way Locust's documentation does gRPC: grpc patched for gevent, and a client interceptor that reports
every call (method name, time, response size) as a Locust request event. Each user keeps one channel for its life.

Custom arguments: --model (the served model's name), --image-dir (JPEG/PNG files Classify sends; default the
digits held-out PNGs, which needs scikit-learn) and --infer-batch (images per ModelInfer tensor).
"""

import contextlib
import random
import time

import gevent
import gevent.event
import grpc
import grpc.experimental.gevent as grpc_gevent
import numpy as np
from locust import User, constant, events, task
from locust.exception import LocustError
from locust.runners import MasterRunner

from loadtest.payloads import images, random_pixels, random_tensor
from service._proto import classifier_pb2, classifier_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc

# Must run before any channel exists: without it a blocking gRPC call stalls every user of this process.
grpc_gevent.init_gevent()


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    parser.add_argument("--model", default="digits_resnet", help="served model the users call")
    parser.add_argument("--image-dir", default="", help="folder of JPEG/PNG files for Classify; default: digits PNGs")
    parser.add_argument("--infer-batch", type=int, default=1, help="images per ModelInfer request tensor")


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Fires `environment.events.request` for each unary call, named by its method (e.g. /resnet.v1.Classifier/...)."""

    def __init__(self, environment) -> None:
        self.environment = environment

    def intercept_unary_unary(self, continuation, client_call_details, request):
        start = time.perf_counter()
        call = continuation(client_call_details, request)
        exception = None
        response_length = 0
        try:
            response_length = call.result().ByteSize()
        except grpc.RpcError as error:
            exception = error
        self.environment.events.request.fire(
            request_type="grpc",
            name=client_call_details.method,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=response_length,
            response=call,
            context=None,
            exception=exception,
        )
        return call


class GrpcUser(User):
    """A user with one channel to `host` ("HOST:PORT") whose calls are reported to Locust."""

    abstract = True
    wait_time = constant(0)  # closed loop: each user sends its next request as soon as the last one is answered
    timeout_s = 60.0

    def __init__(self, environment) -> None:
        super().__init__(environment)
        if not self.host:
            raise LocustError("give the server's address with --host HOST:PORT")
        self.model = environment.parsed_options.model
        self._plain_channel = grpc.insecure_channel(self.host)
        self.channel = grpc.intercept_channel(self._plain_channel, LocustInterceptor(environment))

    def on_stop(self) -> None:
        self._plain_channel.close()

    def call(self, method, request) -> None:
        """Calls the stub's `method`; a failure is already counted by the interceptor, so the task goes on."""
        with contextlib.suppress(grpc.RpcError):
            method(request, timeout=self.timeout_s)


# Read once per Locust process at start-up, before the clock runs: decoding the digits split takes seconds, which
# would otherwise be spent inside the first users' on_start of a timed run. The reading runs in gevent's thread pool
# so that the event loop keeps turning meanwhile: a worker has joined its master by then, and a worker whose loop
# stands still for seconds misses its heartbeats and is dropped as missing.
CLASSIFY_IMAGES: list[bytes] = []
_IMAGES_READ = gevent.event.Event()


@events.init.add_listener
def _read_images(environment, **_kwargs) -> None:
    # A master only aggregates; its workers send the images.
    if ClassifyUser in (environment.user_classes or ()) and not isinstance(environment.runner, MasterRunner):
        CLASSIFY_IMAGES[:] = gevent.get_hub().threadpool.apply(images, (environment.parsed_options.image_dir,))
    _IMAGES_READ.set()


class ClassifyUser(GrpcUser):
    """resnet.v1.Classifier/Classify with a random image of the folder each time."""

    def on_start(self) -> None:
        self.stub = classifier_pb2_grpc.ClassifierStub(self.channel)
        _IMAGES_READ.wait()  # a worker may be told to start its users while it is still reading them
        self.images = CLASSIFY_IMAGES

    @task
    def classify(self) -> None:
        request = classifier_pb2.ClassifyRequest(model=self.model, image=random.choice(self.images), top_k=1)
        self.call(self.stub.Classify, request)


class ModelInferUser(GrpcUser):
    """KServe v2 ModelInfer with a random float32 tensor [infer_batch, 3, S, S], S read from ModelMetadata."""

    datatype = "FP32"

    def on_start(self) -> None:
        # Asked on the plain channel, so that the statistics hold only the inference calls.
        metadata = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self._plain_channel).ModelMetadata(
            grpc_service_pb2.ModelMetadataRequest(name=self.model), timeout=self.timeout_s
        )
        (model_input,) = metadata.inputs
        self.shape = self.input_shape(self.environment.parsed_options.infer_batch, model_input.shape[2])
        self.input_name = model_input.name
        self.stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.rng = np.random.default_rng()

    @staticmethod
    def input_shape(batch: int, size: int) -> tuple[int, ...]:
        return (batch, 3, size, size)

    def payload(self) -> bytes:
        return random_tensor(self.shape, self.rng)

    @task
    def infer(self) -> None:
        request = grpc_service_pb2.ModelInferRequest(
            model_name=self.model,
            inputs=[
                grpc_service_pb2.ModelInferRequest.InferInputTensor(
                    name=self.input_name, datatype=self.datatype, shape=self.shape
                )
            ],
            raw_input_contents=[self.payload()],
        )
        self.call(self.stub.ModelInfer, request)


class ModelInferUint8User(ModelInferUser):
    """ModelInfer with random raw pixels, UINT8 [infer_batch, S, S, 3] (NHWC): the layout ModelMetadata does not
    advertise (it lists FP32 NCHW) but the server takes as its fast path; S is the same metadata's."""

    datatype = "UINT8"

    @staticmethod
    def input_shape(batch: int, size: int) -> tuple[int, ...]:
        return (batch, size, size, 3)

    def payload(self) -> bytes:
        return random_pixels(self.shape, self.rng)
