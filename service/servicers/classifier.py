"""resnet.v1.Classifier: encoded image in, top-k softmax predictions out."""

import grpc
import torch

from service._proto import classifier_pb2, classifier_pb2_grpc
from service.decoding import ImageDecoder
from service.lifecycle import ServedModel
from service.metrics import ServiceMetrics
from service.rpc import CallScope, RpcError, deadline_of, rpc_handler
from service.served_models import ServedModels

DEFAULT_TOP_K = 5


class ClassifierServicer(classifier_pb2_grpc.ClassifierServicer):
    def __init__(
        self,
        models: ServedModels,
        scope: CallScope,
        metrics: ServiceMetrics,
        *,
        image_decoder: ImageDecoder,
    ) -> None:
        self._models = models
        self.call_scope = scope
        self._metrics = metrics
        self._image_decoder = image_decoder

    @rpc_handler(lambda request: request.model)
    async def Classify(
        self, request: classifier_pb2.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.ClassifyResponse:
        # In flight until the batcher has answered: an unload of the model waits for it.
        async with self._models.serving(request.model) as model:
            top_k = resolve_top_k(request.top_k, model.output.num_classes)
            # Decoding is CPU work (and Pillow releases the GIL): thread pools, never the event loop.
            image = await self._image_decoder.decode(request.image, model.preprocessing)
            result = await model.batcher.submit(image.unsqueeze(0), deadline=deadline_of(context))
        self._metrics.record_batched(model.name, result.queue_us, result.compute_us)
        probabilities = torch.softmax(result.logits[0], dim=0)
        scores, indices = probabilities.topk(top_k)
        labels = model.output.labels
        predictions = [
            classifier_pb2.Prediction(index=index, label=labels[index], score=score)
            for index, score in zip(indices.tolist(), scores.tolist(), strict=True)
        ]
        return classifier_pb2.ClassifyResponse(
            model=model.name,
            predictions=predictions,
            queue_us=result.queue_us,
            compute_us=result.compute_us,
            batch_size=result.batch_size,
        )

    @rpc_handler()
    async def ListModels(
        self, request: classifier_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> classifier_pb2.ListModelsResponse:
        return classifier_pb2.ListModelsResponse(models=[_model_info(model) for model in self._models.models])


def resolve_top_k(requested: int, num_classes: int) -> int:
    """0 means DEFAULT_TOP_K (capped at the class count); more than the class count is the client's mistake."""
    if requested == 0:
        return min(DEFAULT_TOP_K, num_classes)
    if requested > num_classes:
        raise RpcError(
            grpc.StatusCode.INVALID_ARGUMENT, f"top_k {requested} is more than the model's {num_classes} classes"
        )
    return requested


def _model_info(model: ServedModel) -> classifier_pb2.ModelInfo:
    """What ListModels says of a model in any state; classes and dtype are known once it has loaded."""
    config, loaded = model.config, model.loaded
    return classifier_pb2.ModelInfo(
        name=model.name,
        arch=config.arch,
        ready=model.ready,
        reason=model.reason,
        input_size=config.input_size,
        num_classes=0 if loaded is None else loaded.output.num_classes,
        backend=model.backend_kind,
        dtype="" if loaded is None else loaded.precision.name,
        max_batch_size=config.max_batch_size,
        max_queue_delay_us=config.max_queue_delay_us,
        weights=config.weights,
    )
