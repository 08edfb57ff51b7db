"""The vocabulary matrix as two parameters: the base's own rows and the rows the merge added.

Each can then be its own optimizer parameter group with its own learning rate (`embed_lr_base`,
`embed_lr_new`: multiples of the stage lr), or the base rows can be frozen outright. Scaling the
gradient of the base rows would not slow them: Adam divides each element's update by the root of its
own second moment, so a scaled gradient gives the same step. It has to be the learning rate, or a freeze.

A parameter belongs to one group only, so while a run trains, the matrix PEFT made trainable is held by
one of the modules below instead (`split_rows`), and written back into PEFT's own piece before the
adapter is saved (`join_rows`). The adapter on disk is therefore exactly what it was without the split
(stage 1: TrainableTokens rows; stage 2 / SFT: a `modules_to_save` matrix), `PeftModel.from_pretrained`
and `zhllama merge` read it as before, and a tied model stays tied (one matrix).

* `RowSplitEmbedding` replaces, in stage 2 and SFT, the trainable copy inside PEFT's
  `ModulesToSaveWrapper`; in stage 1 it replaces the `TrainableTokensLayer` and keeps the frozen
  embedding as `original_module` (what `count_trainable` discounts, as it does for PEFT's copies). Its
  lookup takes each id from the piece that holds it: no concatenated matrix per step.
* `RowSplitHead` replaces lm_head's trainable copy (untied), or, on a tied model, lm_head itself,
  holding the very same two parameters as the embedding: the logits of the base rows and of the new
  rows side by side (the loss computes them chunk by chunk, zhllama/loss.py).

With the base rows frozen (lr multiple 0) they are a parameter that does not require a gradient: no
gradient, no Adam moments, not in the checkpoint (frozen parameters never are), and written back
bit-identical. Stage 1 does better still: TrainableTokens of the new rows only (no split at all).
"""

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

ADAPTER = "default"  # PEFT's adapter name (pretrain/adapters.py)
GROUPS = ("lora", "base_rows", "new_rows", "embeddings", "other")  # the optimizer groups, in this order


class RowSplitEmbedding(nn.Module):
    """An embedding whose rows [0, split) and [split, V) are two parameters."""

    def __init__(self, weight: torch.Tensor, split: int, *, train_base: bool = True, padding_idx=None,
                 original_module: Optional[nn.Module] = None):
        super().__init__()
        self.split = int(split)
        self.base_rows = nn.Parameter(weight[:split].detach().clone(), requires_grad=train_base)
        self.new_rows = nn.Parameter(weight[split:].detach().clone())
        self.padding_idx = padding_idx
        self.original_module = original_module  # stage 1: the frozen embedding this stands in for

    @property
    def weight(self) -> torch.Tensor:
        """The whole matrix (a copy): for reading it, never used by the forward."""
        return torch.cat([self.base_rows, self.new_rows])

    @property
    def num_embeddings(self) -> int:
        return self.split + self.new_rows.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.new_rows.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.split
        pad = self.padding_idx
        base = F.embedding(ids.masked_fill(is_new, 0), self.base_rows,
                           padding_idx=pad if pad is not None and pad < self.split else None)
        new = F.embedding((ids - self.split).clamp_min(0), self.new_rows,
                          padding_idx=pad - self.split if pad is not None and pad >= self.split else None)
        return torch.where(is_new.unsqueeze(-1), new, base)


class RowSplitHead(nn.Module):
    """lm_head over the two pieces: logits of the base rows, then of the new rows."""

    def __init__(self, base_rows: nn.Parameter, new_rows: nn.Parameter):
        super().__init__()
        self.base_rows, self.new_rows = base_rows, new_rows  # the embedding's own parameters when tied

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base_rows, self.new_rows])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.linear(hidden, self.base_rows), F.linear(hidden, self.new_rows)], dim=-1)


def _own_head(weight: torch.Tensor, split: int, train_base: bool) -> RowSplitHead:
    return RowSplitHead(nn.Parameter(weight[:split].detach().clone(), requires_grad=train_base),
                        nn.Parameter(weight[split:].detach().clone()))


# ------------------------------------------------------------------------------------ split and join

@dataclass
class _Swap:
    """A module taken out of the model while the split one trains in its place."""
    parent: nn.Module
    name: str
    original: nn.Module
    split_module: nn.Module
    kind: str  # "copy": a ModulesToSaveWrapper's trained copy; "tokens": a TrainableTokensLayer; "tied": lm_head


@dataclass
class RowSplit:
    split: int
    swaps: List[_Swap] = field(default_factory=list)


def _path(root: nn.Module, module: nn.Module):
    for name, mod in root.named_modules():
        if mod is module:
            parent_name, _, attr = name.rpartition(".")
            return root.get_submodule(parent_name), attr
    raise ValueError(f"{type(module).__name__} is not inside {type(root).__name__}")


def _shrink(t: torch.Tensor) -> None:
    """Free a tensor's storage while its module is out of the model (refilled by join_rows)."""
    t.data = t.data.new_empty((0,) + tuple(t.shape[1:]))


def split_rows(peft_model, split: int, *, train_base: bool = True, tied: bool = False) -> Optional[RowSplit]:
    """Put the split modules in place of the matrix PEFT trains; returns the record `join_rows` undoes,
    or None when nothing spans both ranges (stage 1 with new rows only: the base rows are no parameters)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from peft.utils.other import ModulesToSaveWrapper

    base = peft_model.get_base_model()
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    record = RowSplit(int(split))
    if isinstance(emb, TrainableTokensLayer):
        rows = list(emb.token_indices[ADAPTER])
        if min(rows) >= split:
            return None
        if rows != list(range(emb.base_layer.weight.shape[0])):
            raise ValueError("a TrainableTokens layer is split only when it trains every row")
        delta = emb.trainable_tokens_delta[ADAPTER]
        new = RowSplitEmbedding(delta, split, train_base=train_base, padding_idx=emb.base_layer.padding_idx,
                                original_module=emb.base_layer)
        _shrink(delta)
        _shrink(emb.trainable_tokens_original[ADAPTER])
        parent, name = _path(base, emb)
        record.swaps.append(_Swap(parent, name, emb, new, "tokens"))
        setattr(parent, name, new)
        if tied:  # PEFT's tied TrainableTokens on lm_head follows the embedding's delta: follow the pieces
            parent, name = _path(base, head)
            split_head = RowSplitHead(new.base_rows, new.new_rows)
            record.swaps.append(_Swap(parent, name, head, split_head, "tied"))
            setattr(parent, name, split_head)
        return record
    if not isinstance(emb, ModulesToSaveWrapper):
        raise ValueError(f"embed_tokens is a {type(emb).__name__}, not a module PEFT trains")
    copy = emb.modules_to_save[ADAPTER]
    new = RowSplitEmbedding(copy.weight, split, train_base=train_base, padding_idx=copy.padding_idx)
    _shrink(copy.weight)
    record.swaps.append(_Swap(emb.modules_to_save, ADAPTER, copy, new, "copy"))
    emb.modules_to_save[ADAPTER] = new
    if tied:  # lm_head's weight was the copy's (adapters._retie): it now computes from the same two pieces
        parent, name = _path(base, head)
        split_head = RowSplitHead(new.base_rows, new.new_rows)
        record.swaps.append(_Swap(parent, name, head, split_head, "tied"))
        setattr(parent, name, split_head)
    elif isinstance(head, ModulesToSaveWrapper):
        copy_h = head.modules_to_save[ADAPTER]
        split_head = _own_head(copy_h.weight, split, train_base)
        _shrink(copy_h.weight)
        record.swaps.append(_Swap(head.modules_to_save, ADAPTER, copy_h, split_head, "copy"))
        head.modules_to_save[ADAPTER] = split_head
    return record


def join_rows(peft_model) -> None:
    """Write the trained pieces back into PEFT's modules and put those back, undoing `split_rows`; the
    model is then what PEFT built, holding the trained values (what `save_adapter` writes and checks)."""
    record: Optional[RowSplit] = getattr(peft_model, "zhllama_row_split", None)
    if record is None:
        return
    for swap in reversed(record.swaps):
        with torch.no_grad():
            joined = swap.split_module.weight.detach().clone()
        if swap.kind == "tokens":
            swap.original.trainable_tokens_delta[ADAPTER].data = joined
            swap.original.trainable_tokens_original[ADAPTER] = swap.original.base_layer.weight.detach().clone()
        elif swap.kind == "copy":
            swap.original.weight.data = joined
        if isinstance(swap.parent, nn.ModuleDict):
            swap.parent[swap.name] = swap.original
        else:
            setattr(swap.parent, swap.name, swap.original)
    peft_model.zhllama_row_split = None


# ---------------------------------------------------------------------------------- optimizer groups

def _row_pieces(model) -> dict:
    """id(parameter) -> 'base_rows' / 'new_rows' for the split pieces and for TrainableTokens of new rows."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    split = getattr(model, "zhllama_split_rows_at", None)
    out = {}
    for mod in model.modules():
        if isinstance(mod, (RowSplitEmbedding, RowSplitHead)):
            out[id(mod.base_rows)] = "base_rows"
            out[id(mod.new_rows)] = "new_rows"
        elif isinstance(mod, TrainableTokensLayer) and mod.tied_adapter is None and split is not None:
            if ADAPTER in mod.token_indices and min(mod.token_indices[ADAPTER]) >= split:
                out[id(mod.trainable_tokens_delta[ADAPTER])] = "new_rows"
    return out


def _group_of(name: str, param, pieces: dict) -> str:
    if id(param) in pieces:
        return pieces[id(param)]
    if ".lora_" in name:
        return "lora"
    if "trainable_tokens_delta" in name or ".modules_to_save." in name:
        return "embeddings"  # the whole matrix as one parameter: a model without a recorded base vocab size
    return "other"


def trainable_groups(model) -> dict:
    """Group name -> trainable parameters (each counted once), for the groups that have any."""
    pieces = _row_pieces(model)
    out = {}
    for name, p in model.named_parameters():  # a tied parameter is yielded once
        if p.requires_grad:
            group = _group_of(name, p, pieces)
            out[group] = out.get(group, 0) + p.numel()
    return {g: out[g] for g in GROUPS if g in out}


def param_groups(model, lr: float, *, base_scale: float = 1.0, new_scale: float = 1.0) -> list:
    """The optimizer's parameter groups: one per group of `GROUPS` that has trainable parameters, each
    with its `name`, its `lr_scale` (a multiple of the stage lr) and `lr`."""
    scales = {"base_rows": base_scale, "new_rows": new_scale}
    pieces = _row_pieces(model)
    params = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            params.setdefault(_group_of(name, p, pieces), []).append(p)
    return [{"params": params[g], "name": g, "lr_scale": scales.get(g, 1.0), "lr": lr * scales.get(g, 1.0)}
            for g in GROUPS if g in params]


def largest_trained_matrix(model) -> int:
    """Elements of the largest trained matrix; a split matrix's trained pieces count together (their
    gradients are computed by the same backward, so they exist at the same time)."""
    sizes = {id(p): p.numel() for p in model.parameters() if p.requires_grad}
    for mod in model.modules():
        if isinstance(mod, (RowSplitEmbedding, RowSplitHead)):
            pieces = [p for p in (mod.base_rows, mod.new_rows) if p.requires_grad]
            for p in pieces:
                sizes[id(p)] = sum(q.numel() for q in pieces)
    return max(sizes.values(), default=0)


def describe_groups(groups: dict) -> str:
    """'base rows 1,234, new rows 567, LoRA 89' for the trainable-% line."""
    label = {"lora": "LoRA", "base_rows": "base rows", "new_rows": "new rows", "embeddings": "embeddings",
             "other": "other"}
    return ", ".join(f"{label[g]} {n:,}" for g, n in groups.items())
