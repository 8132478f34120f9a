"""The 3D process grid: pipeline x data x tensor parallelism.

Ranks are laid out by DeepSpeed's PipeModelDataParallelTopology, axes (pipe, data, model) in
row-major order: the tensor-parallel ("model") coordinate varies fastest, so the ranks of a TP
group are adjacent (one node on GPU clusters, where TP's per-layer all-reduces need NVLink), and
the pipeline coordinate varies slowest. Building our groups from the same object that the
PipelineModule receives keeps our TP groups identical to DeepSpeed's slice groups.

`Topology` is also the "mpu" object DeepSpeed asks for (deepspeed.initialize(mpu=...) without a
pipeline, deepspeed.checkpointing.configure(mpu_=...) with one). We follow Megatron's naming:
"model parallel" means *tensor* parallel. DeepSpeed's own PipelineParallelGrid instead calls
pipe x tensor "model parallel"; that grid is what a PipelineEngine uses, and it never sees ours.
"""
from __future__ import annotations

import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megatron_neox.layout import Layout, data_parallel_size


class Topology:
    """This rank's place in the (pipe, data, model) grid, its process groups, and the mpu API.

    `Topology(pp, tp)` reads world size and rank from torch.distributed (which must be initialised
    when the world has more than one rank) and creates the TP, DP and PP groups: every rank
    creates every group in the same order, as torch.distributed requires. Pass `world_size`,
    `rank` and `create_groups=False` to compute coordinates for any rank without a process group
    (planning tools, tests).

    When groups exist, every axis has a real group, a one-rank group for an axis of size 1:
    `None` would mean torch's *world* group to anyone who passes it to a collective. The groups
    are `None` only when there is no distributed world (`Topology.single()`, or
    `create_groups=False`); the parallel layers treat `None` as tp = 1.
    """

    def __init__(self, pp: int, tp: int, world_size: int | None = None, rank: int | None = None,
                 *, create_groups: bool = True):
        distributed = dist.is_available() and dist.is_initialized()
        if world_size is None:
            world_size = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        dp = data_parallel_size(world_size, pp, tp)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size} ranks")

        self.pp, self.tp, self.dp = pp, tp, dp
        self.world_size, self.rank = world_size, rank
        self.topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=self.dp)
        coord = self.topo.get_coord(rank)
        self.pp_rank, self.dp_rank, self.tp_rank = coord.pipe, coord.data, coord.model
        # Global ranks of the groups this rank belongs to, in group-rank order.
        self.tp_ranks = self.topo.filter_match(pipe=self.pp_rank, data=self.dp_rank)
        self.dp_ranks = self.topo.filter_match(pipe=self.pp_rank, model=self.tp_rank)
        self.pp_ranks = self.topo.filter_match(data=self.dp_rank, model=self.tp_rank)
        self.is_first_stage = self.pp_rank == 0
        self.is_last_stage = self.pp_rank == pp - 1

        self.tp_group = self.dp_group = self.pp_group = None
        if create_groups and (world_size > 1 or distributed):
            if not distributed:
                raise RuntimeError(f"Topology(pp={pp}, tp={tp}) over {world_size} ranks needs "
                                   f"torch.distributed to be initialised first")
            if (dist.get_world_size(), dist.get_rank()) != (world_size, rank):
                raise ValueError(
                    f"Topology world_size={world_size}, rank={rank} disagree with torch.distributed "
                    f"(world size {dist.get_world_size()}, rank {dist.get_rank()})")
            self._create_groups()

    @classmethod
    def from_layout(cls, layout: Layout) -> "Topology":
        """This rank's grid for a validated layout (torch.distributed must be initialised, see
        training/launch.py, and its world must be `layout.world_size` ranks)."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world != layout.world_size:
            raise ValueError(f"the layout is for {layout.world_size} ranks (pp={layout.pp} tp={layout.tp} "
                             f"dp={layout.dp}) but torch.distributed has {world}")
        return cls(layout.pp, layout.tp)

    @classmethod
    def single(cls) -> "Topology":
        """One rank, no torch.distributed needed; every group is None."""
        return cls(pp=1, tp=1, world_size=1, rank=0, create_groups=False)

    def _create_groups(self) -> None:
        singleton = None
        for axis, attr in (("model", "tp_group"), ("data", "dp_group"), ("pipe", "pp_group")):
            if self.topo.get_dim(axis) == 1:
                # One set of one-rank groups serves every axis of size 1.
                if singleton is None:
                    for r in range(self.world_size):
                        group = dist.new_group(ranks=[r])
                        if r == self.rank:
                            singleton = group
                setattr(self, attr, singleton)
                continue
            for ranks in self.topo.get_axis_comm_lists(axis):
                group = dist.new_group(ranks=ranks)
                if self.rank in ranks:
                    setattr(self, attr, group)

    def __repr__(self) -> str:
        return (f"Topology(pp={self.pp}, tp={self.tp}, dp={self.dp}; rank {self.rank} -> "
                f"pp_rank={self.pp_rank}, dp_rank={self.dp_rank}, tp_rank={self.tp_rank})")

    # ---- Megatron-style mpu API, as called by DeepSpeed 0.19 (engine, ZeRO, runtime/utils.py
    # grad norms, activation checkpointing, model_checkpointing, utils/bwc.py). Deliberately
    # absent: `initialize_sequence_parallel` -- its mere presence tells DeepSpeed the mpu is a
    # Ulysses one and makes ZeRO ignore the model-parallel group.

    def get_global_rank(self) -> int:
        return self.rank

    # Tensor parallel ("model parallel" in Megatron, "slice parallel" in DeepSpeed's grid).
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    def get_model_parallel_group(self):
        return self.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of TP rank 0 in this rank's TP group (the broadcast source)."""
        return self.tp_ranks[0]

    def get_slice_parallel_rank(self) -> int:
        return self.tp_rank

    def get_slice_parallel_world_size(self) -> int:
        return self.tp

    def get_slice_parallel_group(self):
        return self.tp_group

    # Data parallel.
    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.dp_ranks)

    # Pipeline parallel.
    def get_pipe_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipe_parallel_world_size(self) -> int:
        return self.pp

    def get_pipe_parallel_group(self):
        return self.pp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp

    def get_pipeline_model_parallel_group(self):
        return self.pp_group

    def is_pipeline_first_stage(self) -> bool:
        return self.is_first_stage

    def is_pipeline_last_stage(self) -> bool:
        return self.is_last_stage

    # DeepSpeed's "sequence parallel" is Ulysses (its own axis), not Megatron sequence parallelism
    # (which lives inside the TP group). We have no Ulysses axis: size 1, and the ZeRO / gradient
    # all-reduce group is the plain data-parallel group.
    def get_sequence_parallel_world_size(self) -> int:
        return 1

    def get_sequence_parallel_rank(self) -> int:
        return 0

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.dp

    def get_sequence_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_sequence_data_parallel_group(self):
        return self.dp_group
