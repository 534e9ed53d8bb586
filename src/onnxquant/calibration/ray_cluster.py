"""Calibration sharded across the workers of a Ray cluster.

``calibration_backend="ray"`` connects to an existing cluster (``ray_address="host:port"``, a
cluster started elsewhere with ``ray start --head``) or starts a local one bound to 127.0.0.1,
and shuts down only a cluster it started itself (a Ray already initialised in this process is
used as it is and left running).

The model is shipped once: the augmented model is serialized with its weights inline and put in
Ray's object store (``ray.put``), from which every worker node fetches it once — so no shared
filesystem is needed, and models over protobuf's 2 GB limit are refused (calibrate those with the
local backend). Each of the ``workers`` actors (one CPU each, one onnxruntime thread) builds its
own session from those bytes. The parent reads and validates the feeds and sends them in shards
of consecutive feeds; an actor runs a shard into fresh observers and returns their states, which
the parent merges in shard order with the local backend's :func:`merge_observers` — so the
ranges equal a single process's for every method (histograms and min/max merge exactly; the
MinMax moving average merges as a weighted mean, as with local processes). At most two shards
per worker are in flight, so memory stays bounded however long the feed stream is.

A shard that fails (the task raised, or its worker died) is run once more, on another worker (a
dead worker is replaced first); if that fails too, the error names both workers and the shard's
feeds. Calibration never goes on with fewer samples.

The machinery is generic — :func:`map_shards` runs any picklable :class:`ShardJob` (a model
opened once per worker, then shards of feeds) and hands each shard's result to a merge callback
in shard order; :func:`run_on_ray` is the static ranges' job, and GPTQ's Hessian accumulation
(``onnxquant.weight_only``) is another.

Ray is imported only here and only when this backend is used: ``pip install onnxquant[ray]``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import onnx_ir as ir
from tqdm.auto import tqdm

from onnxquant.calibration.parallel import merge_observers, observe, shard_session
from onnxquant.core.errors import CalibrationError
from onnxquant.core.model_io import PROTOBUF_LIMIT, clone_model, load_external_tensors

__all__ = ["BACKENDS", "RAY_MISSING", "ShardJob", "backend_problem", "map_shards", "model_bytes",
           "ray_available", "ray_session", "run_on_ray", "valid_ray_address"]

logger = logging.getLogger(__name__)

RAY_MISSING = ("calibration_backend='ray' needs Ray, which is not installed; install it with "
               "pip install 'onnxquant[ray]'")
SHARD_FEEDS = 8  # consecutive feeds per shard (one task)
_IN_FLIGHT = 2  # shards queued per worker
_START_SECONDS = 300.0  # how long the workers may take to start (schedule, build sessions)
BACKENDS = ("local", "ray")
_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_ADDRESS = re.compile(r"(ray://)?[^\s:/]+:\d{1,5}")


def ray_available() -> bool:
    """Whether Ray can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # a broken install, or sys.modules["ray"] = None
        return False


def valid_ray_address(address: str) -> bool:
    """Whether ``address`` is ``host:port``, ``ray://host:port`` or ``auto``."""
    return address == "auto" or (isinstance(address, str)
                                 and _ADDRESS.fullmatch(address) is not None)


def backend_problem(backend: str, address: str | None, workers: int) -> str | None:
    """What is wrong with a calibration backend choice (None when it is usable)."""
    if backend not in BACKENDS:
        return (f"calibration_backend must be one of {', '.join(map(repr, BACKENDS))}, "
                f"got {backend!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        return f"calibration_workers must be an int >= 1, got {workers!r}"
    if address is not None and backend != "ray":
        return "ray_address is given but calibration_backend is not 'ray'; set both"
    if address is not None and not valid_ray_address(address):
        return (f"ray_address must be 'host:port' (e.g. '10.0.0.5:6379'), 'ray://host:port' "
                f"or 'auto', got {address!r}")
    if backend == "ray" and not ray_available():
        return RAY_MISSING
    return None


def _ray() -> Any:
    if not ray_available():
        raise CalibrationError(RAY_MISSING)
    import ray  # type: ignore[import-not-found,unused-ignore]

    return ray


@contextlib.contextmanager
def ray_session(address: str | None, workers: int) -> Iterator[Any]:
    """The ``ray`` module, connected for the duration of the block.

    With ``address``, connects to that cluster; otherwise uses a Ray already initialised in this
    process, or starts a local cluster with ``workers`` CPUs bound to 127.0.0.1 (no dashboard).
    Only a connection or cluster made here is shut down on exit.
    """
    ray = _ray()
    started = False
    if not ray.is_initialized():
        try:
            if address:
                ray.init(address=address, configure_logging=False)
            else:
                with _loopback(ray):
                    ray.init(address="local", num_cpus=workers, include_dashboard=False,
                             configure_logging=False, log_to_driver=False)
        except Exception as err:  # ConnectionError, RuntimeError, ValueError from ray.init
            where = f"the Ray cluster at '{address}'" if address else "a local Ray cluster"
            raise CalibrationError(
                f"could not connect to {where}: {err}. Start one with `ray start --head` and "
                "pass its address (host:port), or omit the address for a local cluster; a "
                "cluster with token authentication (on by default in recent Ray) also needs "
                "RAY_AUTH_MODE=token and its token here (~/.ray/auth_token or RAY_AUTH_TOKEN)"
            ) from err
        started = True
    elif address:
        logger.info("Ray is already initialised in this process; its cluster is used, not '%s'",
                    address)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


@contextlib.contextmanager
def _loopback(ray: Any) -> Iterator[None]:
    """Make a local cluster started in the block listen on 127.0.0.1 only.

    Ray replaces a loopback ``_node_ip_address`` by the machine's address on Linux; what keeps
    every process on 127.0.0.1 is its single-machine mode
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read by the processes ``ray.init`` starts, and
    the constant the driver already read).
    """
    constants: Any = getattr(getattr(ray, "_private", None), "ray_constants", None)
    before_env = os.environ.get(_SINGLE_MACHINE)
    before = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_SINGLE_MACHINE] = "0"
    if before is not None:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if before_env is None:
            os.environ.pop(_SINGLE_MACHINE, None)
        else:
            os.environ[_SINGLE_MACHINE] = before_env
        if before is not None:
            constants.ENABLE_RAY_CLUSTER = before


class ShardJob(Protocol):
    """What a worker does: ``open`` the shipped model once (the job is pickled to the workers
    before that), then ``run`` shards of feeds, returning a result and how many feeds ran."""

    def open(self, model: bytes) -> None: ...

    def run(self, first: int, feeds: list[dict]) -> tuple[Any, int]: ...


@dataclasses.dataclass
class _Observe:
    """The static job: an onnxruntime session over the augmented model updating fresh copies of
    the observers (their states are the shard's result)."""

    providers: list[str]
    outputs: dict[str, str]
    observers: dict
    threads: int = 1
    _session: Any = None

    def open(self, model: bytes) -> None:
        self._session = shard_session(model, self.providers, self.threads)

    def run(self, first: int, feeds: list[dict]) -> tuple[dict, int]:
        observers = copy.deepcopy(self.observers)
        return observers, observe(self._session, self.outputs, observers,
                                  enumerate(feeds, first))


class _ShardRunner:
    """A Ray actor: one :class:`ShardJob` opened over the shipped model, running shards."""

    def __init__(self, model: bytes, job: ShardJob) -> None:
        self._job = job
        job.open(model)

    def where(self) -> str:
        """Host and process of this worker (for error messages)."""
        return f"{socket.gethostname()} pid {os.getpid()}"

    def run(self, first: int, feeds: list[dict]) -> tuple[Any, int]:
        """The job's result for ``feeds`` (numbered from ``first``), and how many it ran."""
        return self._job.run(first, feeds)


@dataclasses.dataclass
class _Shard:
    number: int
    first: int
    feeds: list[dict]
    worker: int
    attempt: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)

    def describe(self) -> str:
        last = self.first + len(self.feeds) - 1
        return f"shard {self.number} (feeds {self.first}-{last})"


class _Pool:
    """The actors, replaced when they die, with where each one runs."""

    def __init__(self, ray: Any, model_ref: Any, job: ShardJob, workers: int) -> None:
        self._ray = ray
        self._cls = ray.remote(num_cpus=1, max_restarts=0)(_ShardRunner)
        self._model_ref, self._job = model_ref, job
        self.actors = [self._cls.remote(model_ref, job) for _ in range(workers)]
        self.where = self._locate(range(workers))

    def _locate(self, indexes: Sequence[int]) -> list[str]:
        try:
            return self._ray.get([self.actors[i].where.remote() for i in indexes],
                                 timeout=_START_SECONDS)
        except self._ray.exceptions.GetTimeoutError:
            raise CalibrationError(
                f"the Ray cluster did not start {len(indexes)} calibration workers (one CPU "
                f"each) within {_START_SECONDS:.0f} s; give fewer calibration_workers or a "
                "cluster with more free CPUs") from None
        except self._ray.exceptions.RayError as err:
            raise CalibrationError(
                f"a Ray calibration worker could not start: {_reason(err)}. Every node needs "
                "onnxquant[ray] and the same onnxruntime installed") from err

    def replace(self, index: int) -> None:
        with contextlib.suppress(Exception):
            self._ray.kill(self.actors[index])
        self.actors[index] = self._cls.remote(self._model_ref, self._job)
        self.where[index] = self._locate([index])[0]

    def name(self, index: int) -> str:
        return f"worker {index} ({self.where[index]})"

    def close(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self._ray.kill(actor)


def _reason(err: BaseException) -> str:
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def model_bytes(augmented: ir.Model) -> bytes:
    """The augmented model serialized with every weight inline (what the workers load)."""
    model = clone_model(augmented)
    load_external_tensors(model)
    data = ir.serde.serialize_model(model).SerializeToString()
    if len(data) > PROTOBUF_LIMIT:
        raise CalibrationError(
            "the model is over protobuf's 2 GB limit and cannot be shipped to a Ray cluster; "
            "calibrate it with calibration_backend='local'")
    return data


def _shards(feeds: Any, size: int) -> Iterator[tuple[int, list[dict]]]:
    batch: list[dict] = []
    first = 0
    for index, feed in enumerate(feeds):
        if not batch:
            first = index
        batch.append(feed)
        if len(batch) == size:
            yield first, batch
            batch = []
    if batch:
        yield first, batch


def run_on_ray(augmented: ir.Model, outputs: dict[str, str], observers: dict, feeds: Any, *,
               providers: Sequence[str], workers: int, address: str | None,
               total: int | None, progress: bool) -> int:
    """Run validated ``feeds`` on ``workers`` Ray actors; merges into ``observers``.

    Returns:
        The number of feeds processed.

    Raises:
        CalibrationError: Ray is missing or unreachable, or a shard failed twice.
    """
    _ray()  # before the model is serialized
    return map_shards(model_bytes(augmented), _Observe(list(providers), outputs, observers),
                      feeds, lambda shard: merge_observers(observers, [shard]),
                      workers=workers, address=address, total=total, progress=progress)


def map_shards(model: bytes, job: ShardJob, feeds: Any, merge: Callable[[Any], None], *,
               workers: int, address: str | None, total: int | None, progress: bool,
               shard_feeds: int = SHARD_FEEDS, desc: str = "calibrating (ray)") -> int:
    """Run ``job`` over shards of ``shard_feeds`` consecutive ``feeds`` on ``workers`` Ray
    actors; ``merge`` gets each shard's result in shard order.

    ``model`` (serialized, see :func:`model_bytes`) is put in the object store once and every
    actor opens the job over it. A shard that fails is retried once on another worker.

    Returns:
        The number of feeds processed.

    Raises:
        CalibrationError: Ray is missing or unreachable, or a shard failed twice.
    """
    with ray_session(address, workers) as ray:
        model_ref = ray.put(model)
        del model
        pool = _Pool(ray, model_ref, job, workers)
        try:
            return _drive(ray, pool, merge, _shards(feeds, shard_feeds), workers, total,
                          progress, desc)
        finally:
            pool.close()


def _drive(ray: Any, pool: _Pool, merge: Callable[[Any], None], source: Any, workers: int,
           total: int | None, progress: bool, desc: str) -> int:
    """Deal shards to the pool (bounded), retry failures once, merge in shard order."""
    pending: dict[Any, _Shard] = {}
    done: dict[int, Any] = {}
    merged = samples = 0

    def submit(shard: _Shard) -> None:
        pending[pool.actors[shard.worker].run.remote(shard.first, shard.feeds)] = shard

    with tqdm(total=total, desc=desc, unit="sample", disable=not progress) as bar:
        for number, (first, batch) in enumerate(source):
            submit(_Shard(number, first, batch, number % workers))
            while len(pending) >= _IN_FLIGHT * workers:
                samples += _collect(ray, pool, pending, done, submit, workers, bar)
            merged = _merge_ready(merge, done, merged)
        while pending:
            samples += _collect(ray, pool, pending, done, submit, workers, bar)
        _merge_ready(merge, done, merged)
    return samples


def _collect(ray: Any, pool: _Pool, pending: dict, done: dict[int, Any], submit: Any,
             workers: int, bar: Any) -> int:
    """Wait for one shard; store its result, or resubmit it once, or raise."""
    [ref], _ = ray.wait(list(pending), num_returns=1)
    shard = pending.pop(ref)
    try:
        result, count = ray.get(ref)
    except ray.exceptions.RayError as err:
        shard.failures.append(f"{pool.name(shard.worker)}: {_reason(err)}")
        if isinstance(err, ray.exceptions.RayActorError):
            pool.replace(shard.worker)
        if shard.attempt >= 1:
            raise CalibrationError(
                f"calibration {shard.describe()} failed on two Ray workers; nothing is "
                "computed from fewer samples. " + "; ".join(shard.failures)) from err
        logger.warning("calibration %s failed on %s; retrying it once", shard.describe(),
                       shard.failures[-1])
        shard.attempt += 1
        shard.worker = (shard.worker + 1) % workers
        submit(shard)
        return 0
    if count != len(shard.feeds):
        raise CalibrationError(f"calibration {shard.describe()} ran {count} of "
                               f"{len(shard.feeds)} feeds on {pool.name(shard.worker)}")
    done[shard.number] = result
    bar.update(count)
    return count


def _merge_ready(merge: Callable[[Any], None], done: dict[int, Any], merged: int) -> int:
    """Merge the finished shards that follow the merged ones; returns the next to merge."""
    while merged in done:
        merge(done.pop(merged))
        merged += 1
    return merged
