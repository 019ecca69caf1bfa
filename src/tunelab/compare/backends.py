"""Where a grid's units of work run: a local pool (the default) or a Ray cluster (``--backend ray``).

A backend takes callables with the resources each needs and hands results back as they finish, so the
grid runner (cells) and the tuning trials use one scheduler. The contract of a submitted callable:
it is a module-level function (Ray pickles it by reference), it takes a keyword ``gpus`` (the device
ids it may use: ``[]`` = none, ``None`` = the machine has none to pin; a ``Gpus`` list, which also says
what share of a card's memory the unit may take when it shares the card) and returns a picklable value. Only
the caller, in the driver process, acts on the results (the grid writes every store row itself).

GPUs (docs/gpu.md): with ``--workers N`` and G visible GPUs, each card takes ceil(N / G) cells at once; a cell
on a shared card is capped at that share of its memory (``pin`` -> ``distributed.cap_memory``:
``torch.cuda.set_per_process_memory_fraction``), so one GPU runs N small cells side by side, and N GPUs run
one cell each. A cell asking for several GPUs (``resources.gpus: 2``) takes whole, unshared cards. On Ray a
fractional ``num_gpus`` (``resources.gpus: 0.25``) shares a card the same way, capped at that fraction.

>>> backend = LocalBackend(workers=2)                        # doctest: +SKIP
>>> backend.submit("a", fn, 1, resources=Resources(gpus=1))  # doctest: +SKIP
>>> for done in backend.results(): print(done.tag, done.value or done.error)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Protocol

from tunelab.errors import ConfigError, TunelabError

BACKENDS = ("local", "ray")
RAY_MAX_RETRIES = 3  # resubmissions of a task whose worker process or node died (a cell's own error is final)


@dataclass(frozen=True)
class Resources:
    """What one unit of work (a grid cell) asks for; ``None`` = the default of the device (``resolve``)."""

    cpus: int | None = None  # cores, and torch threads unless the grid sets model.threads
    gpus: float | None = None  # whole GPUs (the local pool); Ray also accepts fractions such as 0.5
    processes: int | None = None  # > 1: the cell trains data-parallel under `accelerate launch` (compare.launch)

    def __post_init__(self) -> None:
        if self.processes is not None and (isinstance(self.processes, bool) or self.processes < 1):
            raise ConfigError(f"resources.processes: {self.processes} is out of range; give a whole number >= 1")
        if self.cpus is not None and (isinstance(self.cpus, bool) or self.cpus < 1):
            raise ConfigError(f"resources.cpus: {self.cpus} is out of range; give a whole number >= 1")
        if self.gpus is not None and (isinstance(self.gpus, bool) or self.gpus < 0):
            raise ConfigError(f"resources.gpus: {self.gpus} is out of range; give a number >= 0")


@dataclass
class Finished:
    """One unit of work that ended: ``value`` when it returned, else ``error`` (why it could not run)."""

    tag: Any
    value: Any = None
    error: str | None = None


class Backend(Protocol):
    """Runs submitted callables with their resources; results come back in completion order."""

    name: str

    def defaults(self) -> Resources:
        """The per-unit resources used where the grid names none (from the machine or cluster)."""
        ...

    def submit(self, tag: Any, fn: Callable[..., Any], *args: Any, resources: Resources, **kwargs: Any) -> None:
        """Queue ``fn(*args, gpus=[...], **kwargs)``; its result is yielded by ``results`` under ``tag``."""
        ...

    def results(self) -> Iterator[Finished]:
        """Every submitted unit's outcome as it finishes (blocks until all are done)."""
        ...

    def close(self) -> None:
        ...


def resolve(asked: Resources, defaults: Resources) -> Resources:
    """The grid's ``resources`` with each unset field taken from the backend's defaults."""
    return Resources(cpus=asked.cpus if asked.cpus is not None else defaults.cpus,
                     gpus=asked.gpus if asked.gpus is not None else defaults.gpus,
                     processes=asked.processes if asked.processes is not None else defaults.processes)


# --- GPU pinning on one machine ------------------------------------------------------------------------


def visible_gpus(env: Mapping[str, str] | None = None, count: int | None = None) -> list[str]:
    """The GPU ids this process may hand out: the entries of CUDA_VISIBLE_DEVICES, else ``0..count-1``.

    >>> visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, count=2)
    ['2', '3']
    >>> visible_gpus({}, count=2)
    ['0', '1']
    """
    listed = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if listed is not None:  # ids as the user gave them (numbers or GPU-UUIDs), so children see the same devices
        return [x.strip() for x in listed.split(",") if x.strip() and x.strip() != "-1"]
    if count is None:
        count = _cuda_device_count()
    return [str(i) for i in range(count)]


def _cuda_device_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()  # NVML: does not initialise CUDA in this process
    except Exception:  # no torch build with CUDA: no GPUs to pin
        return 0


class Gpus(list):
    """The GPU ids handed to one unit (a ``list[str]``, as every callable takes them) and, on a card it shares
    with other units, the fraction of the card's memory it may use (None: the cards are its own)."""

    def __init__(self, ids: Sequence[str] = (), memory_fraction: float | None = None) -> None:
        super().__init__(ids)
        self.memory_fraction = memory_fraction


def pin(gpus: Sequence[str] | None, env: MutableMapping[str, str]) -> None:
    """Set a unit's process environment before torch touches CUDA: only its GPUs visible, and its memory share
    (``distributed.MEMORY_FRACTION_ENV``, applied when the run resolves its device) where it shares a card.

    >>> env = {}; pin(Gpus(["0"], memory_fraction=0.25), env); env
    {'CUDA_VISIBLE_DEVICES': '0', 'TUNELAB_GPU_MEMORY_FRACTION': '0.25'}
    """
    from tunelab.distributed import MEMORY_FRACTION_ENV

    if gpus is None:  # a machine without GPUs: nothing to pin
        return
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    fraction = getattr(gpus, "memory_fraction", None)
    if fraction:
        env[MEMORY_FRACTION_ENV] = f"{fraction:.6g}"
    else:
        env.pop(MEMORY_FRACTION_ENV, None)  # a forked child may have inherited another cell's share


class GpuPool:
    """Hands each running unit its GPUs and takes them back when it ends (blocking while none are free).

    ``share``: units one card may run at once. A unit asking for one GPU takes a place on the least loaded
    card, capped at 1/share of its memory; a unit asking for several takes whole cards nobody uses.
    """

    def __init__(self, ids: Sequence[str], share: int = 1) -> None:
        self.ids = list(ids)
        self.size = len(self.ids)
        self.share = max(1, share)
        self._load = dict.fromkeys(self.ids, 0)  # units running on each card
        self._cond = threading.Condition()

    @property
    def free(self) -> list[str]:
        """Cards no unit is using."""
        return [g for g in self.ids if not self._load[g]]

    def acquire(self, n: int) -> Gpus:
        """``n`` distinct GPU ids, lowest first; waits for running units to release theirs."""
        if n > self.size:
            raise TunelabError(f"a cell asks for {n} GPUs but this machine shows {self.size}; lower resources.gpus")
        with self._cond:
            if n == 1 and self.share > 1:
                self._cond.wait_for(lambda: min(self._load.values()) < self.share)
                card = min(self.ids, key=lambda g: self._load[g])  # least loaded; the lowest id on a tie
                self._load[card] += 1
                return Gpus([card], memory_fraction=1 / self.share)
            self._cond.wait_for(lambda: len(self.free) >= n)
            taken = self.free[:n]
            for g in taken:
                self._load[g] = self.share  # whole cards: nobody shares them
            return Gpus(taken)

    def release(self, ids: Sequence[str]) -> None:
        with self._cond:
            for g in ids:
                self._load[g] -= 1 if len(ids) == 1 and self.share > 1 else self.share
            self._cond.notify_all()


# --- the local pool ------------------------------------------------------------------------------------


class LocalBackend:
    """Up to ``workers`` units at once on this machine, each on its own GPU(s) where there are GPUs, or on a
    share of one when there are more workers than GPUs (ceil(workers / GPUs) per card, memory-capped).

    Each thread only waits on its unit; the grid's cells isolate themselves in child processes, so a
    crashed cell is an error result, not a dead pool (nothing to retry: a cell killed for memory would
    be killed again).
    """

    name = "local"

    def __init__(self, workers: int = 1, gpu_ids: Sequence[str] | None = None) -> None:
        self.workers = max(1, workers)
        ids = visible_gpus() if gpu_ids is None else list(gpu_ids)
        self.gpus = GpuPool(ids, share=math.ceil(self.workers / len(ids)) if ids else 1)
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="tunelab-cell")
        self._futures: dict[Future[Any], Any] = {}

    def defaults(self) -> Resources:
        return Resources(cpus=max(1, (os.cpu_count() or 1) // self.workers), gpus=1 if self.gpus.size else 0)

    def submit(self, tag: Any, fn: Callable[..., Any], *args: Any, resources: Resources, **kwargs: Any) -> None:
        gpus = resources.gpus or 0
        if gpus != int(gpus):
            raise ConfigError(f"resources.gpus: {gpus} GPUs; the local pool pins whole GPUs (--workers N with "
                              "fewer GPUs shares each card between cells; --backend ray takes fractions)")
        self._futures[self._pool.submit(self._call, int(gpus), fn, args, kwargs)] = tag

    def _call(self, n: int, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.gpus.size:  # a machine without GPUs: nothing to pin
            return fn(*args, gpus=None, **kwargs)
        ids = self.gpus.acquire(n) if n else Gpus()  # [] hides the GPUs from a cell that asked for none
        try:
            return fn(*args, gpus=ids, **kwargs)
        finally:
            self.gpus.release(ids)

    def results(self) -> Iterator[Finished]:
        for future in as_completed(list(self._futures)):
            tag = self._futures.pop(future)
            try:
                yield Finished(tag, value=future.result())
            except Exception as exc:  # a bug in the unit's own driver-side code: report it, go on with the rest
                yield Finished(tag, error=f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# --- Ray -----------------------------------------------------------------------------------------------


def _import_ray() -> Any:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # tunelab never phones home on the user's behalf
    try:
        import ray
    except ImportError:
        raise TunelabError("--backend ray needs Ray: pip install 'tunelab[ray]'") from None
    return ray


def _ray_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Body of every Ray task: Ray has set CUDA_VISIBLE_DEVICES to the task's GPUs; pass them on, with the
    fraction of a card a fractional ``num_gpus`` asked for (Ray schedules fractions but caps no memory)."""
    import ray

    assigned = ray.get_runtime_context().get_assigned_resources().get("GPU", 0)
    return fn(*args, gpus=ray_gpus([str(g) for g in ray.get_gpu_ids()], assigned), **kwargs)


def ray_gpus(ids: Sequence[str], assigned: float) -> Gpus:
    """A Ray task's GPUs: a share of one card (``num_gpus`` < 1) caps its memory at that share.

    >>> ray_gpus(["0"], 0.25).memory_fraction, ray_gpus(["0", "1"], 2).memory_fraction
    (0.25, None)
    """
    return Gpus(ids, memory_fraction=assigned if 0 < assigned < 1 else None)


class RayBackend:
    """Each unit is a Ray task with ``num_cpus``/``num_gpus`` from its resources, retried on worker death.

    ``address``: ``None`` joins the Ray instance this process already started (or starts a local one),
    ``auto`` the cluster running on this machine (``ray start --head``), ``HOST:PORT`` a remote head.
    ``storage`` tells the grid's cells whether the output folder is shared (``compare.remote``):
    ``auto`` finds out per task, ``shared`` or ``return`` force one way.
    """

    name = "ray"

    def __init__(self, address: str | None = None, max_retries: int = RAY_MAX_RETRIES, storage: str = "auto") -> None:
        self.ray = _import_ray()
        self.max_retries = max_retries
        self.storage = storage
        self._owns = False
        if not self.ray.is_initialized():
            _check_reachable(address)
            try:
                self.ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise TunelabError(f"cannot reach a Ray cluster at --address {address}: {exc}; start one with "
                                   "`ray start --head` (docs/scaling.md)") from None
            self._owns = True  # started here, so shut down here
        self._remote = self.ray.remote(_ray_call)
        self._refs: dict[Any, Any] = {}
        self._fits: set[Resources] = set()

    def defaults(self) -> Resources:
        """One GPU per unit where the cluster has GPUs (with its share of the cores), else one core."""
        total = self.ray.cluster_resources()
        gpus, cpus = total.get("GPU", 0), total.get("CPU", 1)
        if gpus:
            return Resources(cpus=max(1, int(cpus // gpus)), gpus=1)
        return Resources(cpus=1, gpus=0)

    def fits(self, resources: Resources) -> None:
        """Refuse resources no node of the cluster has: Ray would keep such a task pending forever."""
        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        for key, asked in (("CPU", resources.cpus or 1), ("GPU", resources.gpus or 0)):
            most = max((n.get(key, 0) for n in nodes), default=0)
            if asked > most:
                raise TunelabError(f"resources.{key.lower()}s: a cell asks for {asked:g} {key}s but no node of the Ray "
                                   f"cluster has more than {most:g}; lower it in the grid's `resources`")

    def submit(self, tag: Any, fn: Callable[..., Any], *args: Any, resources: Resources, **kwargs: Any) -> None:
        if resources not in self._fits:
            self.fits(resources)
            self._fits.add(resources)
        task = self._remote.options(num_cpus=resources.cpus or 1, num_gpus=resources.gpus or 0,
                                    max_retries=self.max_retries, retry_exceptions=False, name=str(tag))
        self._refs[task.remote(fn, args, kwargs)] = tag

    def results(self) -> Iterator[Finished]:
        while self._refs:
            ready, _ = self.ray.wait(list(self._refs), num_returns=1)
            tag = self._refs.pop(ready[0])
            try:
                yield Finished(tag, value=self.ray.get(ready[0]))
            except self.ray.exceptions.RayError as exc:
                yield Finished(tag, error=_ray_error(exc, self.max_retries))

    def close(self) -> None:
        for ref in self._refs:  # Ctrl-C or an error in the driver: stop what is still queued or running
            self.ray.cancel(ref, force=True)
        self._refs.clear()
        if self._owns:
            self.ray.shutdown()


def _check_reachable(address: str | None) -> None:
    """Fail in seconds on a HOST:PORT nobody listens on (``ray.init`` would retry for minutes)."""
    if address is None or address == "auto" or address.startswith("ray://") or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except (OSError, ValueError) as exc:
        raise TunelabError(f"cannot reach a Ray cluster at --address {address}: {exc}; start one with "
                           "`ray start --head` and pass the address it prints (docs/scaling.md)") from None


def _ray_error(exc: Exception, retries: int) -> str:
    """One line for the store: why Ray gave up on a unit."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    if "WorkerCrashed" in name or "NodeDied" in name or "OwnerDied" in name:
        return f"the Ray worker running the cell died {retries + 1} times ({name}: {text})"
    return f"{name}: {text}"


def check_backend(backend: str | Backend, workers: int = 1, address: str | None = None) -> None:
    """Refuse a backend name or flag combination that cannot work, before any cell is planned."""
    name = backend if isinstance(backend, str) else backend.name
    if name not in BACKENDS:
        raise ConfigError(f"--backend: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "local" and address is not None:
        raise ConfigError("--address is for --backend ray; the local pool runs on this machine")
    if name == "ray" and workers > 1:
        raise ConfigError("--workers is for the local pool; on Ray the grid's `resources` (cpus, gpus per cell) "
                          "and the cluster's size decide how many cells run at once")
    if name == "ray" and isinstance(backend, str):
        _import_ray()  # not installed: say so now, not after the grid is validated


def make_backend(name: str, workers: int = 1, address: str | None = None) -> Backend:
    """``local`` (``workers`` at once on this machine) or ``ray`` (tasks on the cluster at ``address``)."""
    check_backend(name, workers, address)
    return LocalBackend(workers) if name == "local" else RayBackend(address)
