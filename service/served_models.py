"""What the servicers need of the served models, whichever process holds them.

In one process that is the ModelManager (service/model_manager.py), which loads the models and runs their batchers.
In a frontend process (service/multiprocess/) it is RemoteModels, a mirror of the engine process's ModelManager whose
batchers forward each request to the engine. The servicers, the HTTP routes and the server are written against this
protocol only, so both serve every RPC the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from service.echo import echo
from service.lifecycle import Loaded, Ready, ServedModel
from service.statistics import InferenceStatistics, RequestTimes


class ModelNotFoundError(LookupError):
    """No model of that name in the repository (NOT_FOUND)."""


class ModelNotReadyError(RuntimeError):
    """The model is loading, failed to load, is draining or was unloaded (UNAVAILABLE)."""


class RequestRecorder(Protocol):
    """Counts one model's requests in its statistics (service/statistics.py ModelStats)."""

    def record_success(self, rows: int, total_ns: int, times: RequestTimes) -> None: ...

    def record_failure(self, total_ns: int) -> None: ...


class ServedModels(Protocol):
    @property
    def models(self) -> list[ServedModel]: ...

    @property
    def settled(self) -> bool:
        """Every model has finished its startup load, one way or the other."""
        ...

    @property
    def any_ready(self) -> bool: ...

    @property
    def required_not_ready(self) -> list[str]: ...

    def is_known(self, name: str) -> bool: ...

    def find(self, name: str) -> ServedModel:
        """ModelNotFoundError for a name the repository does not have."""
        ...

    def ready_model(self, name: str) -> Loaded:
        """ModelNotFoundError or ModelNotReadyError unless model `name` serves."""
        ...

    def serving(self, name: str) -> AbstractAsyncContextManager[Loaded]:
        """`ready_model(name)`, counted in flight until the block ends (an unload waits for it)."""
        ...

    async def load(self, name: str) -> None: ...

    async def unload(self, name: str) -> None: ...

    def request_statistics(self, name: str) -> RequestRecorder: ...

    async def statistics_snapshot(self) -> InferenceStatistics:
        """Every model's statistics as they stand (read-only)."""
        ...

    def start_loading(self) -> None: ...

    async def stop(self) -> None: ...

    async def wait_for_loader(self, timeout_s: float) -> bool: ...


class ModelTable:
    """The served models by name and the questions asked of them, whoever moves them between states."""

    def __init__(self, models: Iterable[ServedModel]) -> None:
        self._models = {model.name: model for model in models}

    @property
    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    @property
    def any_ready(self) -> bool:
        return any(model.ready for model in self._models.values())

    @property
    def required_not_ready(self) -> list[str]:
        """The models the repository marks `required` that are not ready."""
        return [model.name for model in self._models.values() if model.config.required and not model.ready]

    def is_known(self, name: str) -> bool:
        return name in self._models

    def find(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFoundError(f"no model named {echo(name)}; models: {', '.join(self._models)}") from None

    def ready_model(self, name: str) -> Loaded:
        """What model `name` loaded, while it serves; ModelNotFoundError or ModelNotReadyError otherwise."""
        model = self.find(name)
        if not isinstance(model.state, Ready):
            raise ModelNotReadyError(f"model {name!r} is not ready: {model.reason}")
        return model.state.loaded
