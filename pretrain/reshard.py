"""Resume on another number of ranks: DeepSpeed's ZeRO-1/2 optimizer shards redistributed by parameter name.

A ZeRO-1/2 checkpoint of N ranks holds one optimizer file per rank. Rank r's file has, per parameter
group, r's slice of the flat fp32 master weights (`single_partition_of_fp32_groups`), Adam's state of
that slice (`base_optimizer_state`: exp_avg, exp_avg_sq of the slice and the step), and for every
parameter whose elements fall in the slice, where they lie (`param_slice_mappings`: name -> start,
numel). A parameter's fragments on ranks 0..N-1, in rank order, are the parameter flattened. That is
everything a world-size-free checkpoint needs: on M ranks, each rank reads, for each fragment of its
own new partition (DeepSpeed's `_hp_mapping` of each parameter), the same elements from the old
files, and writes them into its fp32 partition and its Adam state. Nothing is written to disk: a
checkpoint stays one copy of the optimizer state, whatever the next world size.

Why not DeepSpeed's universal checkpoint (`ds_to_universal.py` + `load_universal`), which does the same
from the same `param_slice_mappings`: it is an offline pass that writes a second copy of the fp32
weights and both moments (~12 bytes per trainable parameter, ~5 GB at 7B stage 2 beside a 6 GB
checkpoint, plus a temporary folder of fragments of the same size), and both the conversion and the
universal loader read every file with `torch.load(weights_only=False)` (deepspeed 0.19.8:
ds_to_universal.py, universal_checkpoint.py, base_optimizer.py `load_hp_checkpoint_state_from_checkpoint_dir`),
which would unpickle whatever a run directory holds. Here the old files are read memory-mapped through
`checkpoint.safe_torch_load` (tensors and DeepSpeed's plain classes only), and each rank touches only
the pages it needs.

The per-parameter mapping is by name and by parameter group only as the new engine lays them out, so
any number of groups (per-row learning rates, say) and any grouping of parameters works, as long as
every trainable parameter of the new run has saved state and no saved one is left over.
"""

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import torch

from zhllama.errors import UserError

from .safe_load import safe_torch_load

SHARD_GLOB = "*zero_pp_rank_*_mp_rank_00_optim_states.pt"
_SHARD_RANK = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
FP32 = "fp32"  # the master weights, next to the optimizer state's own keys


@dataclass(frozen=True)
class _Fragment:
    rank: int
    group: int
    start: int  # offset in the rank's flat partition of that group
    numel: int


class SavedShards:
    """The optimizer files of a ZeRO-1/2 checkpoint, read memory-mapped, indexed by parameter name."""

    def __init__(self, engine_dir, saved_world: int):
        engine_dir = Path(engine_dir)
        files = {}
        for f in engine_dir.glob(SHARD_GLOB):
            m = _SHARD_RANK.search(f.name)
            if m:
                files[int(m.group(1))] = f
        if sorted(files) != list(range(saved_world)):
            raise UserError(f"{engine_dir}: a checkpoint of {saved_world} ranks needs the optimizer files of ranks "
                            f"0..{saved_world - 1}; found {sorted(files) or 'none'}")
        self.files = [files[r] for r in range(saved_world)]
        self.shards = [_read_shard(f) for f in self.files]
        self.fragments: Dict[str, List[_Fragment]] = {}
        for rank, shard in enumerate(self.shards):
            for group, mapping in enumerate(shard["param_slice_mappings"]):
                for name, address in mapping.items():
                    self.fragments.setdefault(name, []).append(
                        _Fragment(rank, group, int(address.start), int(address.numel)))
        self.partitioned_keys = sorted(k for k, v in self._group_state(0, 0).items() if _is_partition(v))

    def _group_state(self, rank: int, group: int) -> dict:
        return self.shards[rank]["base_optimizer_state"]["state"][group]

    def _flat(self, rank: int, group: int, key: str) -> torch.Tensor:
        if key == FP32:
            return self.shards[rank]["single_partition_of_fp32_groups"][group]
        return self._group_state(rank, group)[key]

    def numel(self, name: str) -> int:
        return sum(f.numel for f in self.fragments[name])

    def values(self, name: str, key: str, start: int, numel: int) -> torch.Tensor:
        """Elements [start, start + numel) of parameter `name` flattened, of `key` (FP32 or an Adam state key)."""
        out = None
        covered, offset = 0, 0  # offset: where the current fragment starts in the flattened parameter
        for frag in self.fragments[name]:
            lo, hi = max(start, offset), min(start + numel, offset + frag.numel)
            if lo < hi:
                src = self._flat(frag.rank, frag.group, key)
                if out is None:
                    out = torch.empty(numel, dtype=src.dtype)
                out[lo - start:hi - start] = src[frag.start + lo - offset:frag.start + hi - offset]
                covered += hi - lo
            offset += frag.numel
        if covered != numel:
            raise UserError(f"{self.files[0].parent}: the saved optimizer state of {name} has {self.numel(name)} "
                            f"elements; this run's parameter needs elements {start}..{start + numel}")
        return out

    def scalar_state(self, name: str) -> dict:
        """The group-wide optimizer state of the group that held `name` (Adam's step), the same on every rank."""
        found = None
        for frag in self.fragments[name]:
            state = {k: v for k, v in self._group_state(frag.rank, frag.group).items() if not _is_partition(v)}
            if found is not None and not _same(found, state):
                raise UserError(f"{self.files[0].parent}: the ranks' saved optimizer steps for {name} disagree "
                                f"({_plain(found)} vs {_plain(state)})")
            found = state
        return found

    def global_state(self) -> dict:
        """Rank 0's optimizer-wide state (loss scaler, clipping): the same on every rank."""
        return self.shards[0]


def _read_shard(path: Path) -> dict:
    """A shard's optimizer state, checked for what redistribution needs (one line naming the file if not)."""
    mmap = zipfile.is_zipfile(path)  # the zip format maps tensors without reading them
    sd = safe_torch_load(path, map_location="cpu", mmap=mmap)
    opt = sd.get("optimizer_state_dict") if isinstance(sd, dict) else None
    needed = ("param_slice_mappings", "single_partition_of_fp32_groups", "base_optimizer_state")
    if not isinstance(opt, dict) or any(k not in opt for k in needed):
        raise UserError(f"{path}: not a DeepSpeed ZeRO-1/2 optimizer file with per-parameter slice mappings "
                        f"({', '.join(needed)}); resume it on the number of ranks that wrote it")
    if not isinstance(opt["base_optimizer_state"], dict) or "state" not in opt["base_optimizer_state"]:
        raise UserError(f"{path}: written with ZeRO's elastic_checkpoint layout, which is not redistributed here; "
                        "resume it on the number of ranks that wrote it")
    return opt


def _is_partition(value) -> bool:
    return torch.is_tensor(value) and value.dim() == 1


def _plain(state: dict) -> dict:
    return {k: (v.item() if torch.is_tensor(v) else v) for k, v in state.items()}


def _same(a: dict, b: dict) -> bool:
    return _plain(a) == _plain(b)


def load_optimizer(engine, engine_dir, saved_world: int) -> None:
    """Fill this rank's ZeRO-1/2 partition (fp32 master weights, Adam state) of `engine` from a checkpoint
    written by `saved_world` ranks. The module's trainable weights and the scheduler come from DeepSpeed's
    own (world-size-free) model-states file, loaded before this."""
    opt = engine.optimizer
    stage = engine.zero_optimization_stage()
    if stage not in (1, 2) or not hasattr(opt, "bit16_groups"):
        raise UserError(f"{engine_dir}: resuming on another number of ranks needs ZeRO stage 1 or 2 (this run's "
                        f"DeepSpeed config has stage {stage}); resume it on {saved_world} ranks")
    shards = SavedShards(engine_dir, saved_world)
    names = {opt.param_names[lp] for group in opt.bit16_groups for lp in group}
    missing, extra = sorted(names - set(shards.fragments)), sorted(set(shards.fragments) - names)
    if missing or extra:
        raise UserError(f"{engine_dir}: the checkpoint's trainable parameters differ from this run's "
                        f"({len(missing)} without saved state, e.g. {missing[:2]}; {len(extra)} not in this run, "
                        f"e.g. {extra[:2]})")
    base = opt.optimizer
    for i, lp_group in enumerate(opt.bit16_groups):
        flat = base.param_groups[i]["params"][0]  # this rank's fp32 partition of group i
        state = {key: torch.zeros_like(flat) for key in shards.partitioned_keys}
        scalars = None
        for lp in lp_group:
            name = opt.param_names[lp]
            if shards.numel(name) != lp.numel():
                raise UserError(f"{engine_dir}: {name} has {shards.numel(name)} elements in the checkpoint and "
                                f"{lp.numel()} in this run")
            group_scalars = shards.scalar_state(name)
            if scalars is not None and not _same(scalars, group_scalars):
                raise UserError(f"{engine_dir}: parameters of one group of this run were saved with different "
                                f"optimizer steps ({_plain(scalars)} vs {_plain(group_scalars)})")
            scalars = group_scalars
            mapping = getattr(lp, "_hp_mapping", None)
            if mapping is None:  # no element of this parameter is in this rank's partition
                continue
            src, dst = mapping.lp_fragment_address, mapping.hp_fragment_address
            with torch.no_grad():
                flat.narrow(0, dst.start, dst.numel).copy_(shards.values(name, FP32, src.start, src.numel))
                for key in shards.partitioned_keys:
                    state[key].narrow(0, dst.start, dst.numel).copy_(shards.values(name, key, src.start, src.numel))
        state.update({k: (v.clone() if torch.is_tensor(v) else v) for k, v in (scalars or {}).items()})
        base.state[flat] = state
    if hasattr(opt, "_load_global_state"):  # loss scaler (fp16), clipping: DeepSpeed's own restore of them
        opt._load_global_state(shards.global_state())
