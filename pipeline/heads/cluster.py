"""Dask clusters for ``pipeline fit``: a scheduler to connect to, a local cluster, or one local worker per device.

``dask.distributed`` is optional (the ``[dask]`` extra), imported only when a cluster is asked for. A worker
reads its device and torch thread count from the environment in :func:`pin_worker` before each task. A local
cluster is closed when the grid ends; a scheduler given by address is only disconnected from. How to run a
grid on SLURM or PBS: docs/scale-out.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import PipelineError

DASK_INSTALL_HINT = "pip install 'rine-pipeline[dask]' (or: pip install 'dask[distributed]')"
WORKER_DEVICE_ENV = "RINE_PIPELINE_WORKER_DEVICE"
WORKER_THREADS_ENV = "RINE_PIPELINE_WORKER_THREADS"
LOCAL_PREFIX = "local:"
SCHEDULER_PROTOCOLS = ("tcp", "tls", "ws", "wss", "ucx")  # dask's network protocols (inproc is one process only)
# Dask's nanny starts worker processes with MALLOC_TRIM_THRESHOLD_=65536, which turns glibc's dynamic mmap
# threshold off: every tensor over 128 KiB is then mapped and page-faulted anew, and the heads trained ~40 %
# slower on this project's CPUs. The local clusters start their workers without it.
LOCAL_NANNY_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
CONNECT_TIMEOUT_S = 30
WORKERS_TIMEOUT_S = 120


class ClusterError(PipelineError, RuntimeError):
    """A cluster that cannot be reached or started, or dask not installed."""


@dataclass(frozen=True)
class ClusterConfig:
    """Where a grid's tasks run: a scheduler address, ``local:N``, or one local worker per device."""

    scheduler: str | None = None
    devices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if (self.scheduler is None) == (self.devices is None):
            raise ValueError("a cluster is a scheduler (an address or local:N) or a list of devices, one of the two")
        if self.devices is not None and not self.devices:
            raise ValueError("--devices needs at least one device")
        if self.devices is not None:
            check_devices(self.devices)
        if self.scheduler is not None and self.scheduler.startswith(LOCAL_PREFIX):
            local_workers(self.scheduler)
        elif self.scheduler is not None:
            check_scheduler_address(self.scheduler)

    def local_ram_sharers(self) -> int:
        """Worker processes of this machine that each load the features into its RAM (0: a remote cluster)."""
        if self.devices is not None:
            return sum(1 for device in self.devices if not device.startswith(("cuda", "mps")))
        return local_workers(self.scheduler) if self.scheduler.startswith(LOCAL_PREFIX) else 0

    def describe_local(self) -> str:
        if self.devices is not None:
            return f"a local Dask cluster, one worker per device ({', '.join(self.devices)})"
        return f"a local Dask cluster of {local_workers(self.scheduler)} worker processes"


def local_workers(scheduler: str) -> int:
    """N of ``local:N`` (at least 1, at most this machine's CPU count: each worker is a process)."""
    text = scheduler.removeprefix(LOCAL_PREFIX)
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{scheduler!r}: a local cluster is local:N with N >= 1 worker processes, e.g. local:4")
    cpus = os.cpu_count() or 1
    if int(text) > cpus:
        raise ValueError(
            f"{scheduler!r}: local:N starts N worker processes, and this machine has {cpus} CPU(s); "
            f"choose N <= {cpus} (or a scheduler address for a larger cluster)"
        )
    return int(text)


def check_scheduler_address(address: str) -> str:
    """A Dask scheduler address ``[protocol://]host:port`` (tcp, tls, ws, wss, ucx); anything else is a ValueError."""
    protocol, _, rest = address.rpartition("://") if "://" in address else ("tcp", "", address)
    host, _, port = rest.rpartition(":")
    if (
        protocol not in SCHEDULER_PROTOCOLS
        or not host.strip("[]")
        or "/" in rest
        or not port.isdigit()
        or not 0 < int(port) < 65536
    ):
        raise ValueError(
            f"{address!r} is not a scheduler address: give PROTOCOL://HOST:PORT "
            f"({', '.join(SCHEDULER_PROTOCOLS)}; e.g. tcp://head:8786), or local:N"
        )
    return address


def check_devices(devices: tuple[str, ...]) -> tuple[str, ...]:
    """Each device as torch names it; a device this machine lacks is a ValueError (``--devices cuda:0`` without a GPU)."""
    from ..devices import resolve_device

    return tuple(str(resolve_device(device)) for device in devices)


def import_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ClusterError(
            f"--scheduler and --devices run the grid on Dask, which is not installed: {DASK_INSTALL_HINT}"
        ) from None
    return distributed


def worker_threads(n_workers: int) -> int:
    """Torch threads per local worker: the CPUs shared out."""
    return max(1, (os.cpu_count() or 1) // n_workers)


@contextlib.contextmanager
def dask_client(spec: ClusterConfig) -> Iterator[Any]:
    """A ``distributed.Client`` on the cluster ``spec`` names, once a worker (a local cluster: all of them) has
    joined; closed, and a local cluster shut down, on exit. A remote scheduler is waited for as long as it takes
    its first worker to join (batch jobs may wait in their queue), saying so on stderr."""
    distributed = import_distributed()
    import dask

    with contextlib.ExitStack() as stack:
        if spec.scheduler is not None and not spec.scheduler.startswith(LOCAL_PREFIX):
            try:
                client = stack.enter_context(distributed.Client(spec.scheduler, timeout=CONNECT_TIMEOUT_S))
            except (OSError, TimeoutError) as error:
                raise ClusterError(f"cannot reach the Dask scheduler {spec.scheduler}: {error}") from None
            if not client.scheduler_info().get("workers"):
                print(f"waiting for a worker to join the Dask scheduler {spec.scheduler} ...", file=sys.stderr)
                client.wait_for_workers(1)
            yield client
            return
        stack.callback(_restore_environment, dict(os.environ))  # the nannies write their variables into it
        try:
            with dask.config.set(LOCAL_NANNY_CONFIG):
                cluster, n_workers = _local_cluster(distributed, spec)
        except RuntimeError as error:  # distributed's "Nanny failed to start" and the like
            raise ClusterError(f"{spec.describe_local()} did not start: {error}") from error
        stack.enter_context(cluster)
        client = stack.enter_context(distributed.Client(cluster))
        try:
            client.wait_for_workers(n_workers, timeout=WORKERS_TIMEOUT_S)
        except TimeoutError:
            raise ClusterError(
                f"{spec.describe_local()}: fewer than {n_workers} worker(s) joined within {WORKERS_TIMEOUT_S} s"
            ) from None
        yield client


def _restore_environment(saved: dict[str, str]) -> None:
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    os.environ.update(saved)


def _local_cluster(distributed: Any, spec: ClusterConfig) -> tuple[Any, int]:
    """A cluster of worker processes on this machine: ``local:N``, or one per device, each pinned to it."""
    silent = {"dashboard_address": None, "silence_logs": logging.ERROR}
    if spec.devices is None:
        n_workers = local_workers(spec.scheduler)
        env = {WORKER_THREADS_ENV: str(worker_threads(n_workers))}
        return distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, env=env, **silent), n_workers
    devices = spec.devices
    threads = str(worker_threads(len(devices)))
    workers = {
        f"device-{index}": {
            "cls": distributed.Nanny,
            "options": {
                "nthreads": 1,
                "silence_logs": logging.ERROR,
                "env": {WORKER_DEVICE_ENV: device, WORKER_THREADS_ENV: threads},
            },
        }
        for index, device in enumerate(devices)
    }
    scheduler = {"cls": distributed.Scheduler, "options": {"dashboard_address": None}}
    return distributed.SpecCluster(workers=workers, scheduler=scheduler, silence_logs=logging.ERROR), len(devices)


def pin_worker(asked: str) -> torch.device:
    """The device this worker process runs its groups on: the one it was pinned to (``--devices``), else
    ``asked`` (``--device``) as resolved here. A CUDA device with an index becomes the process's current device,
    and torch takes ``WORKER_THREADS_ENV`` threads when it is set."""
    from ..devices import resolve_device

    device = resolve_device(os.environ.get(WORKER_DEVICE_ENV) or asked)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    threads = os.environ.get(WORKER_THREADS_ENV, "")
    if threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))
    return device
