"""Host memory of zero-copy tables: allocation, parallel fill, capacity check, sharing per node.

`HostMemory` allocates the host tensors of one table (the fp32 weight, its low-precision copy and
its optimizer state). One process: ordinary memory. A training job of several processes asks for
node sharing (`share_with_node=True`, a collective): one shared-memory mapping per tensor, created
by the node's first rank and mapped by the others, so the node holds ONE table whatever its
number of GPUs; the rows a step touched are updated by the node's ranks in disjoint shares
(`owned_slots`). The node's ranks are the ranks that see each other's probe files in the shared-memory
mount (never a host name, which two machines may share), and each shared file has its whole
size reserved when it is created, so a full mount is refused at once in one line instead of
killing the job with SIGBUS at a later first touch. Anything else (eval, generation, even inside a training job) gets private memory. With CUDA present every tensor is registered with the driver
(page-locked and device-mapped), so GPU kernels read and write it directly over UVA.
"""

from __future__ import annotations

import math
import os
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from torch import Tensor

from lingua.args import ConfigError

SHM_DIR = "/dev/shm"
FILL_CHUNK = 1 << 24  # elements filled per task (64 MB of fp32): the unit of parallelism and of seeding
CUDA_HOST_REGISTER_PORTABLE_MAPPED = 0x01 | 0x02  # cudaHostRegisterPortable | cudaHostRegisterMapped


def available_host_bytes(shared: bool) -> int:
    """MemAvailable of this machine; for shared tables also the free space of the shared-memory mount."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if shared:
        stats = os.statvfs(SHM_DIR)
        available = min(available, stats.f_bavail * stats.f_frsize)
    return available


def check_host_capacity(needed_bytes: int, what: str, sharing_ranks: int) -> None:
    """Raise a ConfigError naming `what` when this node cannot hold needed_bytes (leaving 10% spare).

    needed_bytes are the bytes of ONE copy of the host tensors; sharing_ranks is the number of this
    node's ranks that map that copy (`HostMemory.local_size`; 1 for private memory). The rule: a
    copy shared by several ranks lives once per node in SHM_DIR, so it is counted once and must also
    fit in the mount's free space; a private copy (pageable or page-locked) belongs to the calling
    rank alone, and every rank that makes one runs this check for its own copy.
    """
    shared = sharing_ranks > 1
    available = available_host_bytes(shared)
    if needed_bytes > 0.9 * available:
        where = f"the free space of {SHM_DIR} and host memory" if shared else "available host memory"
        raise ConfigError(
            f"{what} needs {needed_bytes / 2**30:.1f} GiB of host memory, but {where} is {available / 2**30:.1f} GiB: "
            "use fewer rows (mem_n_keys), a smaller mem_v_dim, value_update=rowwise_adagrad (no Adam moments), "
            "or a machine with more memory"
        )


def _page_aligned_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Zeros starting on a page boundary, in pages no other tensor uses: the driver page-locks whole
    pages, and a page holding parts of two registered tensors cannot be registered twice."""
    page = os.sysconf("SC_PAGE_SIZE")
    n_bytes = math.prod(shape) * dtype.itemsize
    raw = torch.zeros(math.ceil(n_bytes / page) * page + page, dtype=torch.uint8)
    start = -raw.data_ptr() % page
    return raw[start : start + n_bytes].view(dtype).view(shape)


def _reserve_shared_file(path: str, n_bytes: int) -> str | None:
    """Create `path` with n_bytes of zeros allocated up front (posix_fallocate: shared-memory files
    are otherwise sparse); None, or the refusal line when the mount has no room (no file left)."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if n_bytes > 0:
            os.posix_fallocate(descriptor, 0, n_bytes)
    except OSError as error:
        os.unlink(path)
        stats = os.statvfs(os.path.dirname(path))
        return (
            f"a host tensor shared by this node's ranks needs {n_bytes / 2**30:.2f} GiB in {os.path.dirname(path)}, which has "
            f"{stats.f_bavail * stats.f_frsize / 2**30:.2f} GiB free ({error.strerror}): enlarge that mount, use fewer rows "
            "(mem_n_keys), a smaller mem_v_dim or value_update=rowwise_adagrad"
        )
    finally:
        os.close(descriptor)
    return None


def _probe_path(token: str) -> str:
    return os.path.join(SHM_DIR, f"lingua-probe-{token}")


def _register_with_cuda(tensor: Tensor) -> int:
    """Page-lock and device-map `tensor` (not empty); returns the pointer to unregister."""
    pointer, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    status = torch.cuda.cudart().cudaHostRegister(pointer, size, CUDA_HOST_REGISTER_PORTABLE_MAPPED)
    if int(status) != 0:
        raise RuntimeError(f"cannot page-lock {size / 2**30:.1f} GiB of host memory for the GPU (cudaHostRegister error {int(status)})")
    return pointer


def _unregister(pointers: list[int], tensors: list[Tensor]) -> None:
    """Unpin, then let the tensors go (they are held until now so their memory stays valid)."""
    for pointer in pointers:
        torch.cuda.cudart().cudaHostUnregister(pointer)
    tensors.clear()


def fill_normal_(tensor: Tensor, std: float, seed: int, threads: int | None = None) -> Tensor:
    """tensor ~ N(0, std^2), filled by threads in FILL_CHUNK pieces, each with its own generator
    seeded by (seed, piece): the result depends on the seed only, not on the number of threads."""
    flat = tensor.view(-1)
    n_chunks = math.ceil(flat.numel() / FILL_CHUNK)

    def fill(index: int) -> None:
        generator = torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**63)
        flat[index * FILL_CHUNK : (index + 1) * FILL_CHUNK].normal_(0.0, std, generator=generator)

    workers = threads or min(n_chunks, os.cpu_count() or 1)
    if workers <= 1:
        for index in range(n_chunks):
            fill(index)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill, range(n_chunks)))
    return tensor


class HostMemory:
    """Allocator of one table's host tensors (see module docstring). With share_with_node in a
    process group of several ranks, construction and every allocation are collective: every rank
    allocates the same tensors in the same order."""

    def __init__(self, share_with_node: bool = False) -> None:
        self.pin = torch.cuda.is_available()
        self.group: dist.ProcessGroup | None = None
        self.local_rank, self.local_size = 0, 1
        self._first_rank = 0  # the global rank of this node's first rank
        self._token = uuid.uuid4().hex
        self._count = 0
        self._pinned: list[Tensor] = []  # registered tensors, unpinned when this allocator goes away
        self._pointers: list[int] = []
        if self.pin:
            weakref.finalize(self, _unregister, self._pointers, self._pinned)
        if share_with_node and dist.is_initialized() and dist.get_world_size() > 1:
            self._join_node()

    def _join_node(self) -> None:
        """Find the ranks sharing this machine's shared-memory mount (each leaves a probe file there;
        the ranks that see each other's probes are one node), make their process group and agree
        on the shared file names."""
        world, rank = dist.get_world_size(), dist.get_rank()
        with open(_probe_path(self._token), "x"):
            pass
        try:
            tokens: list = [None] * world
            dist.all_gather_object(tokens, self._token)
            seen = tuple(other for other, token in enumerate(tokens) if os.path.exists(_probe_path(token)))
            views: list = [None] * world
            dist.all_gather_object(views, seen)  # returns once every rank has looked: the probes can go
        finally:
            os.unlink(_probe_path(self._token))
        nodes = sorted(set(views))
        if any(other not in view for other, view in enumerate(views)) or sum(map(len, nodes)) != world:
            raise RuntimeError(f"the ranks disagree on which of them share {SHM_DIR} (each rank's view: {views})")
        mine = views[rank]
        self.group, _ = dist.new_subgroups_by_enumeration([list(node) for node in nodes])
        self.local_rank, self.local_size = mine.index(rank), len(mine)
        self._first_rank = mine[0]
        self._token = tokens[mine[0]]

    @property
    def shared(self) -> bool:
        return self.local_size > 1

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """A zero-filled host tensor (shared by the node's ranks when there are several)."""
        if not self.shared:
            tensor = _page_aligned_zeros(shape, dtype)
        else:
            self._count += 1
            path = os.path.join(SHM_DIR, f"lingua-{self._token}-{self._count}")
            numel = math.prod(shape)
            refusal = _reserve_shared_file(path, numel * dtype.itemsize) if self.local_rank == 0 else None  # zero-filled
            if self.group is not None:  # every rank of the node learns the outcome (and waits for the file)
                outcome = [refusal]
                dist.broadcast_object_list(outcome, src=self._first_rank, group=self.group)
                refusal = outcome[0]
            if refusal is not None:
                raise ConfigError(refusal)
            tensor = torch.from_file(path, shared=True, size=numel, dtype=dtype)
            self.barrier()
            if self.local_rank == 0:
                os.unlink(path)  # the mappings stay; nothing is left behind if a rank dies
            tensor = tensor.view(shape)
        if self.pin and tensor.numel() > 0:
            self._pointers.append(_register_with_cuda(tensor))
            self._pinned.append(tensor)
        return tensor

    def fill_normal_(self, tensor: Tensor, std: float, seed: int) -> None:
        """Parallel normal fill, done once per node (the first rank fills, the others wait)."""
        if self.local_rank == 0:
            fill_normal_(tensor, std, seed)
        self.barrier()

    def owned_slots(self, slots: Tensor) -> Tensor:
        """Of a step's slots (positions 0..U-1 in its sorted unique rows), those this rank updates:
        every local_size-th one from local_rank."""
        return slots if not self.shared else slots[self.local_rank :: self.local_size]
