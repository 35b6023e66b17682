"""The lifecycle of one served model, as types: a model is in exactly one state, and each state holds what it has.

    Loading ──▶ Ready(Loaded) ──▶ Draining(Loaded) ──▶ Unloaded
     ▲ └──────▶ Failed(reason)                            │
     └───────────────┴────────────────────────────────────┘  (RepositoryModelLoad)

`Loaded` is everything a request needs (backend, batcher, preprocessing, output), and it is made only once the
backend is warm and the batcher runs. Only Ready and Draining hold one, so code that submits to a batcher must first
have a `Loaded` in hand: `ModelManager.ready_model` is the one way to get it, and the type checker refuses a batcher
reached any other way. `NEXT_STATES` lists the transitions there are; anything else is a bug and raises. Draining
ends in Unloaded when a client unloads the model (it may be loaded again), and stays Draining when the server stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from models.inputs import InputSpec
from models.precision import Precision
from service.batcher import BatchResult
from service.repository import ModelConfig


class BackendInfo(Protocol):
    """What the servicers say of a loaded model's backend (metadata, config). Every Backend has it; a frontend process
    has it of the engine's backend (service/multiprocess/)."""

    @property
    def name(self) -> str: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def preferred_batch_sizes(self) -> tuple[int, ...]: ...


class Batcher(Protocol):
    """Where a request's rows go to be computed: the model's DynamicBatcher, or, in a frontend process, the engine's
    through service/multiprocess/remote_models.py."""

    async def submit(self, inputs: torch.Tensor, deadline: float | None = None) -> BatchResult: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class OutputSpec:
    """What the model answers: logits [n, len(labels)], class i named labels[i]."""

    labels: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Loaded:
    """A model that loaded: its warm backend, its running batcher, how its input is made and what it answers."""

    name: str
    precision: Precision
    backend: BackendInfo
    batcher: Batcher
    preprocessing: InputSpec
    output: OutputSpec


@dataclass(frozen=True)
class Loading:
    """Building the network, its labels and its backend, in the loader thread."""

    reason: str = "loading"


@dataclass(frozen=True)
class Ready:
    """Serving."""

    loaded: Loaded
    reason: str = ""


@dataclass(frozen=True)
class Failed:
    """Could not load; `reason` names the error ("WeightsUnavailableError: ...")."""

    reason: str


@dataclass(frozen=True)
class Draining:
    """Takes no new requests; its batcher finishes those already queued."""

    loaded: Loaded
    reason: str = "draining"


@dataclass(frozen=True)
class Unloaded:
    """Unloaded on a client's request (RepositoryModelUnload), after its queued requests finished."""

    reason: str = "unloaded"


ModelState = Loading | Ready | Failed | Draining | Unloaded

NEXT_STATES: dict[type[ModelState], tuple[type[ModelState], ...]] = {
    Loading: (Ready, Failed),
    Ready: (Draining,),
    Failed: (Loading,),
    Draining: (Unloaded,),
    Unloaded: (Loading,),
}


@dataclass
class ServedModel:
    """One repository entry and its current state. `backend_kind` is resolved ("auto" is gone by now)."""

    config: ModelConfig
    backend_kind: str
    max_queue_size: int
    state: ModelState = Loading()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def ready(self) -> bool:
        return isinstance(self.state, Ready)

    @property
    def reason(self) -> str:
        """Why it is not ready; empty when it is."""
        return self.state.reason

    @property
    def loaded(self) -> Loaded | None:
        """What it loaded, while it holds that (ready or draining)."""
        return self.state.loaded if isinstance(self.state, Ready | Draining) else None

    def enter(self, state: ModelState) -> None:
        """Move to `state`; RuntimeError for a transition the lifecycle does not have."""
        if type(state) not in NEXT_STATES[type(self.state)]:
            raise RuntimeError(f"model {self.name!r}: no transition from {self.state} to {state}")
        self.state = state
