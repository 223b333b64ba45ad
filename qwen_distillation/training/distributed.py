"""The processes of a launch: who this process is, the process group, and the few collectives
the stage loop needs.

A launch starts one process per GPU with ``deepspeed``, ``torchrun`` or ``accelerate launch``;
each finds its place in the environment the launcher sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``). A run with an engine but no
launcher (``distributed=zero3`` on one GPU) is a launch of one. Every collective here is a no-op
in a launch of one, so the single-device path pays nothing.

The data of a step is split without communication: every rank draws the same examples for the
step (the samplers are seeded alike) and runs its share of the step's micro-batches
(:func:`rank_share`), so the medical ratio of the whole step follows the schedule however many
ranks serve it.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qwen_distillation.config.validate import engine_label
from qwen_distillation.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topology:
    """This process's place in the launch: global ``rank`` of ``world_size``, and the
    ``local_rank`` (the GPU index) of ``local_world_size`` processes on this machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, reports and writes shared files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group is up (a launch of more than one, or an engine on one)."""
        return dist.is_available() and dist.is_initialized()


SINGLE = Topology()

# ``extra=`` of a log call whose line tells what this rank itself did (which weights it held, its place in
# the launch): such a line is logged by every rank of a launch, the rest by rank 0 alone.
ALL_RANKS = {"all_ranks": True}
PACKAGE = __name__.split(".")[0]


class MainRankLogs(logging.Filter):
    """On a rank other than 0, pass the package's errors and its lines marked :data:`ALL_RANKS`, and drop its
    other info and warnings: every rank loads the same config and data, so each gave the same lines, N
    copies under N processes. Other libraries' records pass as they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or not record.name.startswith(PACKAGE):
            return True
        return bool(getattr(record, "all_ranks", False))


def log_from_main_rank(topo: Topology | None = None) -> MainRankLogs | None:
    """On a rank other than 0 of a launch, give every handler of the root logger (Hydra's) a
    :class:`MainRankLogs` filter, once; returns the filter installed (None on rank 0 or a launch of one)."""
    topo = topo or env_topology()
    if topo.is_main:
        return None
    handlers = logging.getLogger().handlers
    installed = next((f for h in handlers for f in h.filters if isinstance(f, MainRankLogs)), None)
    installed = installed or MainRankLogs()
    for handler in handlers:
        if installed not in handler.filters:
            handler.addFilter(installed)
    return installed


def env_topology() -> Topology:
    """The launch as the launcher's environment describes it (a launch of one without one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return Topology(rank=int(os.environ.get("RANK", "0")), world_size=world,
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")), local_world_size=local_world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_backend(backend: str, device_type: str) -> str:
    """The process-group backend ``distributed.backend`` names on ``device_type``: ``auto`` is nccl on
    CUDA and gloo elsewhere."""
    if backend == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    return backend


def setup(distributed, device_type: str) -> Topology:
    """Check the launch against ``distributed`` (a DistributedConfig) and the GPUs, and start the
    process group of an engine. Returns this process's :class:`Topology`.

    Raises:
        ConfigError: several processes with ``distributed=none``; more processes on this machine
            than visible GPUs; ``distributed.backend=nccl`` without a GPU; each naming the option or
            launcher flag to change.
    """
    topo = env_topology()
    if distributed.engine == "none":
        if topo.world_size > 1:
            raise ConfigError(f"distributed=none, but the launcher started {topo.world_size} processes "
                              f"(WORLD_SIZE={topo.world_size}): choose an engine for them, e.g. distributed=zero2 "
                              f"(or zero3, zero3_offload, fsdp2; docs/distributed.md), or launch one process")
        return topo
    if device_type == "cuda":
        gpus = torch.cuda.device_count()
        if topo.local_world_size > gpus:
            raise ConfigError(f"{engine_label(distributed)}: the launcher started {topo.local_world_size} processes "
                              f"on this machine but {gpus} GPU(s) are visible; launch at most {gpus} "
                              f"(--nproc_per_node {gpus} / --num_gpus {gpus} / --num_processes {gpus})")
        torch.cuda.set_device(topo.local_rank)
    if not dist.is_initialized():
        backend = group_backend(distributed.backend, device_type)
        if backend == "nccl" and device_type != "cuda":
            raise ConfigError(f"distributed.backend=nccl ({engine_label(distributed)}): NCCL runs on CUDA GPUs only, "
                              f"and this run's device is {device_type}; use distributed.backend=auto (gloo on the "
                              f"CPU) or distributed.backend=gloo")
        if topo.world_size == 1:  # an engine without a launcher: a launch of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)
        timeout = datetime.timedelta(minutes=distributed.timeout_minutes)
        if distributed.engine == "deepspeed":
            import deepspeed

            if device_type == "cpu":
                _no_shm_op()
            deepspeed.init_distributed(dist_backend=backend, timeout=timeout, auto_mpi_discovery=False)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
        atexit.register(_destroy)  # once: a later run in this process keeps the group (see shutdown)
    elif distributed.engine == "deepspeed":  # a later run of this process (a sweep's job) after one under FSDP2
        import deepspeed

        if device_type == "cpu":
            _no_shm_op()
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)  # takes the group
    log.info("rank %d of %d (local rank %d), %s", topo.rank, topo.world_size, topo.local_rank,
             engine_label(distributed), extra=ALL_RANKS)
    return topo


def _no_shm_op() -> None:
    """On the CPU, DeepSpeed compiles a shared-memory all-reduce with gcc when its communication
    starts (and two ranks compiling it at once can collide); nothing is compiled at run time
    here, so its communication goes through torch.distributed's gloo alone."""
    import importlib

    # By module name: the attribute deepspeed.comm.torch is the torch package itself.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def barrier(topo: Topology) -> None:
    if topo.active and topo.world_size > 1:
        dist.barrier()


def all_reduce_sum(topo: Topology, values: list[float]) -> list[float]:
    """The sums over the ranks of ``values`` (the values themselves in a launch of one)."""
    if not topo.active or topo.world_size == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather_object(topo: Topology, value) -> list:
    """Every rank's ``value``, in rank order."""
    if not topo.active or topo.world_size == 1:
        return [value]
    out = [None] * topo.world_size
    dist.all_gather_object(out, value)
    return out


def broadcast_object(topo: Topology, value, src: int = 0):
    """Rank ``src``'s ``value`` on every rank."""
    if not topo.active or topo.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _collective_device() -> torch.device:
    backend = dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def rank_share(items: list, topo: Topology) -> list:
    """This rank's share of a step's micro-batches: every ``world_size``-th one, from its rank.
    The step's micro-batches are sorted by length, so the shares are alike in size."""
    return items[topo.rank::topo.world_size]


def shutdown(topo: Topology) -> None:
    """The end of a run: every rank waits for the others. The process group stays up until the
    process exits (:func:`_destroy`, at exit, so the launch exits cleanly): a Hydra sweep (``-m``)
    runs its jobs one after another in the same processes, and a group destroyed and started again
    within one launch meets the first group's entries in the launcher's store (torchrun's) and
    hangs or fails to connect; the next job's :func:`setup` takes the group as it is."""
    barrier(topo)


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
