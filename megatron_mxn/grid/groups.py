"""The grid's process groups, built inside megatron-core's tensor-parallel groups.

The n*m ranks of one grid are exactly one TP group (tp_rank = i*m + j), so everything that is
not attention keeps seeing ordinary TP. Attention additionally uses two sub-groups of each TP
group: the dim-slice group of rank (i, j) holds ranks (i, 0..m-1) (adjacent ranks: it carries
the per-token score all-reduce), the head-group group holds ranks (0..n-1, j).
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import List, Mapping, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_mxn.grid.layout import MxnConfigError


@dataclass(frozen=True)
class GridGroups:
    """This rank's view of its grid."""

    head_groups: int  # n
    dim_slices: int  # m
    head_group_index: int  # i
    dim_slice_index: int  # j
    dim_slice_group: dist.ProcessGroup  # ranks (i, 0..m-1)
    head_group_group: dist.ProcessGroup  # ranks (0..n-1, j)
    tp_global_ranks: tuple  # global ranks of this TP group in TP order
    # {s: this rank's group of the s consecutive head groups (c*s .. c*s+s-1, j)} for every
    # divisor 1 < s < n: when n > g, the n/g head groups sharing a KV head all-gather its K/V
    # slice over the group of s = n/g (s = n is the head-group group itself).
    kv_share_groups: Mapping[int, dist.ProcessGroup] = field(default_factory=dict)

    def kv_share_group(self, share: int) -> dist.ProcessGroup:
        """The group of the `share` head groups that hold pieces of one KV head with this rank."""
        if share == self.head_groups:
            return self.head_group_group
        if share not in self.kv_share_groups:
            raise MxnConfigError(f"no KV-share group of {share} head groups on a grid with "
                                 f"{self.head_groups} head groups (share must divide n)")
        return self.kv_share_groups[share]

    def labels(self) -> dict:
        """CommCounter labels of the grid's groups (the same names in logs, reports and the
        cost model)."""
        return {"dim-slice": self.dim_slice_group, "head-group": self.head_group_group,
                "KV-share": tuple(self.kv_share_groups.values())}


@dataclass(init=False, repr=False, eq=False)
class MxnProcessGroupCollection(ProcessGroupCollection):
    """megatron-core's ProcessGroupCollection plus the grid's sub-groups: dim-slice, head-group
    and KV-share (a list, like megatron's `hcp`: this rank's group of the s consecutive head
    groups for every divisor 1 < s < n, whose size is s; see GridGroups.kv_share_groups)."""

    mxn_dim_slice: torch.distributed.ProcessGroup = field(init=False)
    mxn_head_group: torch.distributed.ProcessGroup = field(init=False)
    mxn_kv_share: List[torch.distributed.ProcessGroup] = field(init=False)

    @classmethod
    def use_mpu_process_groups(cls, required_pgs: Optional[List[str]] = None):
        """Megatron's groups from parallel_state, plus the grid's from initialize_mxn_parallel."""
        base = [f.name for f in fields(ProcessGroupCollection)]
        wanted = base if required_pgs is None else [p for p in required_pgs if p in base]
        pgs = super().use_mpu_process_groups(required_pgs=wanted)
        grid = get_grid()
        pgs.mxn_dim_slice = grid.dim_slice_group
        pgs.mxn_head_group = grid.head_group_group
        pgs.mxn_kv_share = list(grid.kv_share_groups.values())
        return pgs


_GRID: Optional[GridGroups] = None
_SUBGROUPS: List[dist.ProcessGroup] = []  # the grid's sub-groups (all TP groups' ones)
_MEGATRON_GROUPS: List[dist.ProcessGroup] = []  # parallel_state groups we had megatron create


def _all_groups() -> List[dist.ProcessGroup]:
    return list(dist.distributed_c10d._world.pg_map)


def check_grid_arguments(head_groups: int, dim_slices: int, world_size: int,
                         tensor_model_parallel_size: Optional[int] = None,
                         pipeline_model_parallel_size: int = 1,
                         context_parallel_size: int = 1, **_ignored) -> None:
    """Validate a grid request from local information only, so every rank raises the same
    error before any collective."""
    for name, value in (("head_groups", head_groups), ("dim_slices", dim_slices)):
        if not isinstance(value, int) or value < 1:
            raise MxnConfigError(f"{name} must be a positive integer, got {value!r}")
    grid = head_groups * dim_slices
    if tensor_model_parallel_size is not None and tensor_model_parallel_size != grid:
        raise MxnConfigError(
            f"tensor_model_parallel_size ({tensor_model_parallel_size}) must equal head_groups "
            f"x dim_slices ({head_groups} x {dim_slices} = {grid}): the grid is the TP group")
    if dim_slices > 1 and context_parallel_size > 1:
        raise MxnConfigError(
            f"context parallelism (context_parallel_size={context_parallel_size}) cannot be "
            f"combined with dim slices m={dim_slices} > 1")
    model = grid * pipeline_model_parallel_size * context_parallel_size
    if world_size % model:
        raise MxnConfigError(
            f"world size ({world_size}) must be divisible by grid x PP x CP "
            f"({grid} x {pipeline_model_parallel_size} x {context_parallel_size} = {model})")


def initialize_mxn_parallel(head_groups: int, dim_slices: int,
                            **initialize_model_parallel_kwargs) -> MxnProcessGroupCollection:
    """Initialize megatron-core's parallel_state with TP = head_groups * dim_slices (or, when it
    is already initialized with exactly that TP size, keep it) and add the grid sub-groups.

    Returns the process-group collection to pass to GPTModel and friends."""
    global _GRID
    kwargs = dict(initialize_model_parallel_kwargs)
    tp = kwargs.pop("tensor_model_parallel_size", None)
    world = dist.get_world_size()
    if parallel_state.model_parallel_is_initialized():
        if kwargs:
            raise MxnConfigError(
                f"parallel_state is already initialized; initialize_mxn_parallel only adds the "
                f"grid groups and takes no initialize_model_parallel arguments (got {sorted(kwargs)})")
        tp_now = parallel_state.get_tensor_model_parallel_world_size()
        check_grid_arguments(head_groups, dim_slices, world, tp_now,
                             parallel_state.get_pipeline_model_parallel_world_size(),
                             parallel_state.get_context_parallel_world_size())
    else:
        check_grid_arguments(head_groups, dim_slices, world, tp, **kwargs)
        before = set(_all_groups())
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=head_groups * dim_slices, **kwargs)
        _MEGATRON_GROUPS.extend(g for g in _all_groups() if g not in before)
    if _GRID is not None:
        destroy_mxn_parallel()
    _GRID = _build_subgroups(head_groups, dim_slices,
                             kwargs.get("distributed_timeout_minutes", 30))
    return MxnProcessGroupCollection.use_mpu_process_groups()


def _build_subgroups(n: int, m: int, timeout_minutes: int) -> GridGroups:
    tp_group = parallel_state.get_tensor_model_parallel_group()
    mine = tuple(dist.get_process_group_ranks(tp_group))
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    tp_groups = sorted(set(every))
    timeout = timedelta(minutes=timeout_minutes)
    slices = [list(t[i * m:(i + 1) * m]) for t in tp_groups for i in range(n)]
    heads = [list(t[j::m]) for t in tp_groups for j in range(m)]
    dim_slice_group, all_slices = dist.new_subgroups_by_enumeration(slices, timeout=timeout)
    head_group_group, all_heads = dist.new_subgroups_by_enumeration(heads, timeout=timeout)
    _SUBGROUPS.extend(list(all_slices) + list(all_heads))
    kv_share = {}
    for s in range(2, n):
        if n % s == 0:  # ranks (c*s .. c*s+s-1, j) of every TP group
            sharers = [list(t[c * s * m + j:(c + 1) * s * m:m]) for t in tp_groups
                       for c in range(n // s) for j in range(m)]
            kv_share[s], every_group = dist.new_subgroups_by_enumeration(sharers,
                                                                         timeout=timeout)
            _SUBGROUPS.extend(every_group)
    tp_rank = mine.index(dist.get_rank())
    return GridGroups(n, m, tp_rank // m, tp_rank % m, dim_slice_group, head_group_group, mine,
                      kv_share)


def destroy_mxn_parallel(destroy_model_parallel: bool = False) -> None:
    """Destroy the grid's sub-groups. With destroy_model_parallel, also reset megatron-core's
    parallel_state and destroy the process groups it created for initialize_mxn_parallel
    (megatron only drops its references; each live gloo/NCCL group keeps threads and
    connections, which adds up when layouts are re-initialized many times in one process)."""
    global _GRID
    _GRID = None
    groups = list(_SUBGROUPS)
    _SUBGROUPS.clear()
    if destroy_model_parallel:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        _drop_leftover_megatron_groups()
        groups += _MEGATRON_GROUPS
        _MEGATRON_GROUPS.clear()
    live = set(_all_groups())
    for group in groups:
        if group in live:
            dist.destroy_process_group(group)


def _drop_leftover_megatron_groups() -> None:
    """Forget the groups megatron's destroy_model_parallel leaves in parallel_state (0.19.2 keeps
    _INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP and its _GLOO twin): a group object still referenced
    keeps its gloo threads, which then end only while Python shuts down."""
    for name, value in list(vars(parallel_state).items()):
        if isinstance(value, dist.ProcessGroup):
            setattr(parallel_state, name, None)


def destroy_all_process_groups() -> None:
    """Destroy the grid's, megatron's and torch.distributed's process groups (a no-op before
    torch.distributed is initialized), so that their worker threads end now."""
    destroy_mxn_parallel(destroy_model_parallel=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # (groups still held by reference cycles, e.g. modules, go too)


@contextlib.contextmanager
def clean_shutdown():
    """Run an entry point's body, then destroy every process group while Python is fully alive.

    Left to interpreter exit, a gloo worker thread may still be releasing the last collective
    it ran; freeing that work's tensors takes the GIL, which a finalizing Python answers with
    pthread_exit, and that unwind through C++ ends in std::terminate ("terminate called without
    an active exception", SIGABRT) on some rank of a run that succeeded.

    Groups are destroyed on success, on SystemExit (megatron's deliberate exits) and on
    MxnConfigError (raised alike on every rank). After any other error this rank may have failed
    alone while its peers sit in a collective; destroying could wait for them, so it exits now."""
    try:
        yield
    except (SystemExit, MxnConfigError):
        destroy_all_process_groups()
        raise
    destroy_all_process_groups()


def mxn_parallel_is_initialized() -> bool:
    return _GRID is not None


def get_grid() -> GridGroups:
    """This rank's grid; raises if initialize_mxn_parallel has not run."""
    if _GRID is None:
        raise RuntimeError("the mxn grid is not initialized: call "
                           "megatron_mxn.initialize_mxn_parallel(head_groups, dim_slices, ...)")
    return _GRID


def grid_groups_of(pg_collection: Optional[ProcessGroupCollection]) -> GridGroups:
    """The grid a module should use: the sub-groups carried by its process-group collection
    (an MxnProcessGroupCollection: dim-slice, head-group and KV-share groups), else, for a
    collection without them (megatron's own), the ones initialize_mxn_parallel registered."""
    dim_slice = getattr(pg_collection, "mxn_dim_slice", None) if pg_collection else None
    head_group = getattr(pg_collection, "mxn_head_group", None) if pg_collection else None
    if dim_slice is None or head_group is None:
        return get_grid()
    tp = pg_collection.tp
    kv_share = getattr(pg_collection, "mxn_kv_share", None) or ()
    return GridGroups(
        head_groups=dist.get_world_size(head_group), dim_slices=dist.get_world_size(dim_slice),
        head_group_index=dist.get_rank(head_group), dim_slice_index=dist.get_rank(dim_slice),
        dim_slice_group=dim_slice, head_group_group=head_group,
        tp_global_ranks=tuple(dist.get_process_group_ranks(tp)) if tp is not None else (),
        kv_share_groups={dist.get_world_size(g): g for g in kv_share})
