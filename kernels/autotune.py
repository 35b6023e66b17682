"""Autotuning shared by every kernel form: one candidate timer, results kept on disk per platform, and a record of
every autotuner built and of what each launch ran.

Each kernel form builds its autotuner with `autotune(name, configs, key)`: the key lists every launcher argument
(constexprs passed as keywords included: stride, fusion flags) that changes which config is best, and Triton adds the
dtype of every tensor argument. A kernel form that is its own @triton.jit function is its own autotuner (and Triton's
on-disk entries are keyed by the kernel's source); a form chosen by a constexpr of a shared kernel belongs in the key.

Persistence: after `use_cache_dir(root)`, Triton's cache (compiled kernels, and each tuning key's candidate timings
as `<kernel>.autotune.json`) lives in `root/<platform tag>`, one directory per card, driver, torch and Triton version,
so a restart on the same platform reads its configs instead of timing the candidates again, while an H100 and an
H200 (both sm_90, which Triton's own cache key cannot tell apart) never share timings. Without it, compiled kernels
go to Triton's default cache and no autotune result is kept.

`autotuners()` lists what has been built; `outcome_counts()` says how many tuning keys were timed here ("tuned") and
how many read from the directory ("cached"); `recording_launches()` lists the tuning key and config of each launch.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.testing
from triton import knobs
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

logger = logging.getLogger(__name__)

# Milliseconds that autotuning spends warming up and timing each candidate. Triton's default (25 + 100) makes a
# served ResNet-50 tune ~25 layer shapes x 5 tiles for every batch-size bucket at start-up, minutes in all;
# a ResNet layer runs in 5 us to 2 ms, so 20 ms still averages at least ten launches.
AUTOTUNE_WARMUP_MS = 5
AUTOTUNE_REP_MS = 20

TUNED, CACHED = "tuned", "cached"


@dataclass(frozen=True)
class Launch:
    """One autotuned launch: which autotuner, under which tuning key, with which config."""

    autotuner: str
    key: tuple
    config: triton.Config


class _State:
    """What this process has set up: the kernel cache directory, and the launch log while one is being recorded."""

    cache_dir: Path | None = None
    launches: list[Launch] | None = None


class RecordingAutotuner(Autotuner):
    """Triton's autotuner, persisting its results while a kernel cache directory is set, and noting per tuning key
    whether its config was timed here (TUNED) or read from that directory (CACHED)."""

    def __init__(self, name: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.name = name
        self.outcomes: dict[tuple, str] = {}
        self._read_from_disk = False

    def run(self, *args, **kwargs):
        # Decided per launch, not at construction: a kernel module may build its autotuner at import, before the
        # server has named the directory. The interpreter never tunes (one config per launch there).
        self.cache_results = _State.cache_dir is not None and not knobs.runtime.interpret
        settled = len(self.cache)
        self._read_from_disk = False
        result = super().run(*args, **kwargs)
        if len(self.cache) > settled:  # this launch settled a new key, the newest entry (dicts keep their order)
            key = next(reversed(self.cache))
            self.outcomes[key] = CACHED if self._read_from_disk else TUNED
            logger.debug("%s: %s for key %s: %s", self.name, self.outcomes[key], key, describe_config(self.cache[key]))
        if _State.launches is not None and len(self.configs) > 1:
            _State.launches.append(Launch(self.name, self.tuning_key(args, kwargs), self.best_config))
        return result

    def check_disk_cache(self, tuning_key, configs, bench_fn) -> bool:
        self._read_from_disk = super().check_disk_cache(tuning_key, configs, bench_fn)
        return self._read_from_disk

    def tuning_key(self, args: tuple, kwargs: dict) -> tuple:
        """The key `Autotuner.run` files this launch's config under (triton/runtime/autotuner.py, Triton 3.6): the
        key arguments' values in key order, then the dtype of every tensor argument in argument order."""
        named = {**dict(zip(self.arg_names, args, strict=False)), **kwargs}
        named = {name: value for name, value in named.items() if name in self.arg_names}
        key = [named[name] for name in self.keys if name in named]
        key += [str(value.dtype) for value in named.values() if hasattr(value, "dtype")]
        return tuple(key)


_AUTOTUNERS: dict[str, RecordingAutotuner] = {}


def time_candidate(kernel_call: Callable[[], None], quantiles: Sequence[float]) -> list[float]:
    """The autotuner's benchmark: Triton's do_bench (L2 flushed between launches) with the shorter budget above."""
    return triton.testing.do_bench(kernel_call, warmup=AUTOTUNE_WARMUP_MS, rep=AUTOTUNE_REP_MS, quantiles=quantiles)


def autotune(
    name: str, configs: Sequence[triton.Config], key: Sequence[str]
) -> Callable[[JITFunction], RecordingAutotuner]:
    """`triton.autotune` with our timer, persistence and records, registered under `name` (e.g. "conv_bn_act fp16").

    Every name in `key` must be an argument of the kernel: Triton silently leaves out of the key any name that is not,
    and a misspelled key would let one layer reuse another's config.
    """

    def decorate(kernel: JITFunction) -> RecordingAutotuner:
        unknown = [arg for arg in key if arg not in kernel.arg_names]
        if unknown:
            raise ValueError(f"autotune key {unknown} of {name!r} names no argument of {kernel.arg_names}")
        tuner = RecordingAutotuner(
            name,
            kernel,
            kernel.arg_names,
            list(configs),
            list(key),
            reset_to_zero=None,
            restore_value=None,
            do_bench=time_candidate,
        )
        _AUTOTUNERS[name] = tuner
        return tuner

    return decorate


def autotuners() -> dict[str, RecordingAutotuner]:
    """Every autotuner built so far in this process, by name."""
    return dict(_AUTOTUNERS)


def outcome_counts() -> Counter[str]:
    """Tuning keys settled so far by every autotuner, by outcome (TUNED or CACHED)."""
    return Counter(outcome for tuner in _AUTOTUNERS.values() for outcome in tuner.outcomes.values())


def describe_outcomes(counts: Counter[str]) -> str:
    """One log line: how many configs were read from the kernel cache and how many were tuned here."""
    where = f"the kernel cache {_State.cache_dir}" if _State.cache_dir else "no kernel cache directory (not kept)"
    return f"autotuning: {counts[CACHED]} configs read from the cache, {counts[TUNED]} tuned; {where}"


@contextlib.contextmanager
def recording_launches() -> Iterator[list[Launch]]:
    """Yields a list that receives every autotuned launch made inside the block, in launch order."""
    if _State.launches is not None:
        raise RuntimeError("recording_launches() is already active")
    launches: list[Launch] = []
    _State.launches = launches
    try:
        yield launches
    finally:
        _State.launches = None


def describe_config(config: triton.Config) -> str:
    """A config in one short line, e.g. "BLOCK_M=128 BLOCK_N=64 BLOCK_K=64 GROUP_SIZE_M=8 w8 s3"."""
    meta = " ".join(f"{name}={value}" for name, value in config.kwargs.items())
    extra = "" if config.maxnreg is None else f" maxnreg{config.maxnreg}"
    return f"{meta} w{config.num_warps} s{config.num_stages}{extra}"


@dataclass(frozen=True)
class Platform:
    """What an autotuned config is valid for: the card, its driver, and the torch and Triton versions."""

    card: str
    driver: str
    torch: str
    triton: str

    @property
    def tag(self) -> str:
        """File-name form, e.g. "nvidia-h200_driver-580.159.04_torch-2.11.0+cu130_triton-3.6.0"."""
        parts = (self.card, f"driver-{self.driver}", f"torch-{self.torch}", f"triton-{self.triton}")
        return "_".join(re.sub(r"[^a-z0-9.+]+", "-", part.lower()).strip("-") for part in parts)


_NVIDIA_MODULE_VERSION = re.compile(r"Kernel Module\s+(?:for\s+\S+\s+)?(\d+(?:\.\d+)+)")


def driver_version(proc_file: Path = Path("/proc/driver/nvidia/version")) -> str:
    """The NVIDIA kernel module's version ("580.159.04"); where that file is not readable (some containers), the CUDA
    version the driver supports ("cuda-13000"); "none" without CUDA."""
    with contextlib.suppress(OSError):
        if match := _NVIDIA_MODULE_VERSION.search(proc_file.read_text()):
            return match.group(1)
    if not torch.cuda.is_available():
        return "none"
    # torch has no public call for the driver's CUDA version, and its stubs omit this private one.
    return f"cuda-{torch._C._cuda_getDriverVersion()}"  # type: ignore[attr-defined]


def current_platform() -> Platform:
    """This process's platform: the current CUDA device, or "cpu"."""
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return Platform(card, driver_version(), torch.__version__, triton.__version__)


def use_cache_dir(root: Path | str, platform: Platform | None = None) -> Path:
    """From now on compiled kernels and autotune results are read from and written to root/<platform tag>; returns
    that directory (created). Call it before the first launch: configs tuned earlier stay in memory only."""
    directory = Path(root).expanduser() / (platform or current_platform()).tag
    directory.mkdir(parents=True, exist_ok=True)
    knobs.cache.dir = str(directory)  # also sets TRITON_CACHE_DIR, so child processes compile into it too
    _State.cache_dir = directory
    logger.info("kernel cache (compiled kernels and autotune results): %s", directory)
    return directory


def cache_dir() -> Path | None:
    """The directory `use_cache_dir` set, or None."""
    return _State.cache_dir
