"""One stage trained by several processes together (DistributedDataParallel): what each rank does differently.

Every rank builds the same model from the same seed and walks the same global batches in the same order. A
`Shard` takes a rank's rows of each global batch (rows rank, rank + world, ...; `batch_size` stays the global
batch), DDP averages the gradients, and each rank's loss is weighted by its share of the global batch, so a step
is the step one process takes on the whole batch, up to float rounding. The epoch's sums (loss, correct, seen)
are added across ranks (`reduce_totals`): every rank sees the same metrics and takes the same early-stopping and
plateau decisions. A global batch with fewer rows than ranks (an epoch's last one) is skipped by every rank:
at most `world_size - 1` images an epoch.

Only the collectives live here; starting the processes is `engine/parallel.py`.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

# torch does not list TCPStore in torch.distributed's exports, though it documents it there.
from torch.distributed import TCPStore  # type: ignore[attr-defined]
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, Sampler

# How long a rank waits in a collective for the others. Rank 0 writes each checkpoint to S3 while the others
# wait for the next step, and an S3 outage is waited through for up to its window (5 minutes by default).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
RENDEZVOUS_HOST = "127.0.0.1"


@dataclass(frozen=True)
class Shard:
    """This process's place among the ranks of one job, and the device its collectives run on."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def seed_parts(self) -> tuple[int, ...]:
        """Appended to the per-epoch torch seed: each rank draws its own dropout and augmentation, and rank 0
        draws what one process would."""
        return (self.rank,) if self.rank else ()

    def keeps(self, global_rows: int) -> bool:
        """Whether a global batch of this many rows is trained on (every rank gets at least one row)."""
        return global_rows >= self.world_size

    def rows(self, batch: Tensor) -> Tensor:
        return batch[self.rank :: self.world_size]

    def step(self, local_rows: int, stop: bool) -> tuple[int, bool]:
        """The global batch's size and whether any rank was asked to stop: one collective per optimizer step,
        so that all ranks raise Cancelled at the same step."""
        flags = torch.tensor([float(local_rows), float(stop)], dtype=torch.float64, device=self.device)
        dist.all_reduce(flags)
        return int(flags[0].item()), bool(flags[1].item() > 0)

    def wrap(self, module: nn.Module) -> nn.Module:
        """`module` under DDP; its parameters stay the unwrapped module's (checkpoints hold those)."""
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)


def reduce_totals(loss_sum: float, correct: int, seen: int, shard: Shard) -> tuple[float, int, int]:
    """The sums of every rank's share: the epoch's totals as one process would count them."""
    sums = torch.tensor([loss_sum, float(correct), float(seen)], dtype=torch.float64, device=shard.device)
    dist.all_reduce(sums)
    return float(sums[0].item()), int(sums[1].item()), int(sums[2].item())


def shard_tensor_batches(batches: Iterator[tuple[Tensor, Tensor]], shard: Shard) -> Iterator[tuple[Tensor, Tensor]]:
    """This rank's rows of every global batch of cached features."""
    for x, y in batches:
        if shard.keeps(int(y.shape[0])):
            yield shard.rows(x), shard.rows(y)


class ShardedBatchSampler(Sampler[list[int]]):
    """This rank's indices of every global batch a BatchSampler draws: the DataLoader loads only those."""

    def __init__(self, batches: BatchSampler, shard: Shard) -> None:
        self.batches = batches
        self.shard = shard

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            if self.shard.keeps(len(batch)):
                yield batch[self.shard.rank :: self.shard.world_size]

    def __len__(self) -> int:
        sampler = self.batches.sampler
        assert isinstance(sampler, Sized)
        full, tail = divmod(len(sampler), self.batches.batch_size)
        return full + int(tail > 0 and self.shard.keeps(tail))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def join(rank: int, world_size: int, port: int, device: torch.device, store: TCPStore | None = None) -> Shard:
    """Join the job's process group (rank 0 passes the store it listens on; the others reach it on `port`)."""
    if store is None:
        store = TCPStore(RENDEZVOUS_HOST, port, world_size, is_master=False, timeout=COLLECTIVE_TIMEOUT)
        store.set(_ready_key(rank), "1")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend_for(device), store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )
    return Shard(rank=rank, world_size=world_size, device=device)


def rendezvous_store(world_size: int) -> TCPStore:
    """Rank 0's store on a free loopback port (the OS picks it: no race with other jobs on the machine)."""
    return TCPStore(RENDEZVOUS_HOST, 0, world_size, is_master=True, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)


def _ready_key(rank: int) -> str:
    return f"ready/{rank}"


def await_ranks(store: TCPStore, world_size: int, alive: Callable[[int], bool]) -> None:
    """Rank 0 waits until every other rank has reached the store, and raises RuntimeError as soon as one has died
    before it did (`alive(rank)`): the process group's own rendezvous would wait for it the whole timeout."""
    deadline = time.monotonic() + COLLECTIVE_TIMEOUT.total_seconds()
    for rank in range(1, world_size):
        while not store.check([_ready_key(rank)]):
            if not alive(rank):
                raise RuntimeError(f"training process {rank} exited before it joined the job's other processes")
            if time.monotonic() > deadline:
                raise RuntimeError(f"training process {rank} did not join within {COLLECTIVE_TIMEOUT}")
            time.sleep(0.1)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
