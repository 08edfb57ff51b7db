"""The training loop, on the DeepSpeed engine (ZeRO-2), for every stage.

We drive the engine ourselves (as DeepSpeed-Chat does) instead of going through HF Trainer, because
three things must be exactly right and stay ours:

* the global batch: `global_batch` sequences per optimizer step whatever the world size; rank r of W
  takes a contiguous slice of the step's sample positions, cut into micro-batches;
* the loss: token-weighted over the whole global batch (sum of token losses / tokens in the global
  batch), so 1 rank and 2 ranks compute the same update, and SFT examples of different lengths weigh
  by their tokens, not by their micro-batch;
* the data position and the checkpoint: the sample order is a pure function of (seed, position), so
  resuming at step k replays exactly what an uninterrupted run would have seen (several packs mixed by
  weight included: pretrain/mixture.py).
"""

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from zhllama.dtypes import torch_dtype
from zhllama.errors import ConfigError, UserError
from zhllama.fsutil import atomic_write_json, atomic_write_text
from zhllama.heldout import pad_id
from zhllama.hosts import free_port
from zhllama.log import get_logger
from zhllama.loss import IGNORE_INDEX, CausalLMTokenLoss
from zhllama.modelio import BASE_VOCAB_KEY, load_model, load_tokenizer
from zhllama.schedule import lr_lambda
from zhllama.versions import check_versions, versions_line, versions_record

from . import adapters, checkpoint, rope, row_groups
from .config import RunConfig, dump_config
from .ds_config import build_ds_config, resolve_ds_config, stage_ds_config
from .flops import MFUMeter, adapter_matmul_params, flops_per_token, peak_flops, trainable_matmul_params
from .hooks import TrainHooks
from .memory_fit import decide_gradient_checkpointing
from .precision import assert_fp32_buffers, finite_or_none, json_safe
from .mixture import Mixture, load_sources
from .presets import grad_accumulation
from .shards import BlockOrder, positions_for_rank
from .source_eval import SourceValidation, first_and_last
from .stage_data import Data, registered

log = get_logger("zhllama.train")


# ----------------------------------------------------------------------------- distributed setup

def init_distributed():
    """(rank, world_size, local_rank). Works under `deepspeed`/`torchrun` and as a plain process."""
    import deepspeed

    if "RANK" not in os.environ:  # a plain `zhllama train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend)
        if backend == "gloo":   # CPU ranks; on GPUs no barrier may run before set_device
            release_cpu_allreduce_files()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank


def cpu_allreduce_file(rank: int) -> Path:
    """The /dev/shm file DeepSpeed's CPU all-reduce (its shm comm op) maps for `rank` of this job: named by
    user, MASTER_ADDR, MASTER_PORT and global rank (deepspeed/ops/csrc/cpu/comm/shm.cpp)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_cpu_allreduce_files():
    """Unlink this rank's DeepSpeed CPU all-reduce file once every rank has mapped every rank's file.

    DeepSpeed never unlinks them: each CPU run on local ranks left 69 MB a rank in /dev/shm, which is memory,
    for good (a killed run too); a day of tests filled 16 GB and the next run was OOM-killed.
    `deepspeed.init_distributed` returns on a rank after it has mapped every other rank's file, so after a
    barrier the names can go: the mappings stay valid until the processes end, and nothing is left behind
    however they end."""
    rank = torch.distributed.get_rank()
    path = cpu_allreduce_file(rank)
    torch.distributed.barrier()
    if path.exists():   # absent where DeepSpeed's shm op did not build, or the ranks span nodes
        path.unlink()
        if rank == 0:
            log.info("DeepSpeed's CPU all-reduce files in /dev/shm unlinked once mapped (it leaves them behind)")


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown_distributed():
    """End the process group once every rank is done. gloo's worker threads must be stopped before the
    interpreter exits: left to the interpreter's teardown, a rank can abort ("terminate called without an
    active exception") after a run that succeeded, and the launcher then reports the whole job failed."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def all_reduce_(tensor, op=None):
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=op or torch.distributed.ReduceOp.SUM)
    return tensor


def broadcast_from_rank0(value: int, device) -> int:
    """Global rank 0's `value` on every rank (an integer, through the engine's device for NCCL)."""
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.broadcast(t, src=0)
    return int(t.item())


def first_message(message: Optional[str], device, width: int = 1024) -> Optional[str]:
    """Every rank says something or None; every rank gets the lowest rank's message (None when all were
    None). A collective, hence also a barrier. Text travels as bytes in a tensor: nothing is pickled."""
    if not torch.distributed.is_initialized():
        return message
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    rows = torch.zeros(world, width, dtype=torch.int32, device=device)
    if message:
        data = message.encode("utf-8")[:width]
        rows[rank, :len(data)] = torch.tensor(list(data), dtype=torch.int32, device=device)
    all_reduce_(rows)
    for row in rows.tolist():
        if any(row):
            return bytes(b for b in row if b).decode("utf-8", errors="replace")
    return None


def choose_precision(requested: str, device: torch.device) -> str:
    """bf16 on GPUs that compute it natively (compute capability >= 8.0: A100, H100, 4090...), fp16
    (dynamic loss scaling) on older GPUs such as V100, where bf16 is only emulated; fp32 on CPU."""
    if requested != "auto":
        if requested in ("bf16", "fp16") and device.type != "cuda":
            raise ConfigError(f"config: precision '{requested}' needs a GPU; use precision=fp32 (or auto) on CPU")
        return requested
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"


# ----------------------------------------------------------------------------- data

def _run_record(cfg: RunConfig, rope_change=None) -> dict:
    """The run config as recorded in the adapter; an SFT run adds its template's full definition
    (`template_spec`), so `zhllama merge` can write the chat template even for a user template file,
    and a run that trained with other RoPE settings than its base's records them (`rope`)."""
    record = cfg.to_dict()
    if rope_change is not None:
        record["rope"] = rope_change.record()
    stage_data = registered(cfg.stage, required=cfg.stage == "sft")
    if stage_data is not None and stage_data.run_record is not None:
        record.update(stage_data.run_record(cfg))
    return record


def _collate_blocks(items):
    ids = torch.stack([torch.as_tensor(x, dtype=torch.long) for x in items])
    return {"input_ids": ids, "labels": ids.clone()}


def build_data(cfg: RunConfig, preset, tokenizer, tokenizer_path) -> Data:
    """The stage's data: a registered reader's (sft), else packed shards, one pack or several mixed by
    weight (`data: [packed/zh:0.85, packed/en:0.15]`, pretrain/mixture.py)."""
    stage_data = registered(cfg.stage, required=cfg.stage == "sft")
    if stage_data is not None:
        return stage_data.build(cfg, preset, tokenizer)
    mixture = Mixture(load_sources(cfg.data, tokenizer_path, preset.block_size), cfg.seed, preset.global_batch)
    vals = tuple(s.validation for s in mixture.sources if s.validation is not None)
    return Data(mixture.train, (vals[0] if len(vals) == 1 else vals) or None, _collate_blocks, mixture.describe(),
                mixture=mixture)


# ----------------------------------------------------------------------------- model

def build_model(cfg: RunConfig, preset, dtype, checkpointing: bool = False, rope_change=None):
    tokenizer_path = cfg.tokenizer or cfg.model
    tokenizer = load_tokenizer(tokenizer_path)
    model = load_model(cfg.model, dtype=dtype, tokenizer_path=tokenizer_path,
                       config=rope.hf_config(cfg.model, rope_change))
    if cfg.init_adapters:  # earlier stages' final/ dirs, folded into the weights in order
        log.info("merging earlier stages' adapters: %s", ", ".join(cfg.init_adapters))
        model = adapters.merge_adapters(model, cfg.init_adapters)
    # The base's own rows and the merge's new rows are separate optimizer groups (pretrain/row_groups.py),
    # split where `zhllama vocab resize` recorded the base vocab size.
    base_vocab = getattr(model.config, BASE_VOCAB_KEY, None)
    lr_base, lr_new = cfg.row_lr_scales()
    if not base_vocab and (lr_base, lr_new) != (1.0, 1.0):
        key = "new_rows_only" if cfg.new_rows_only else ("embed_lr_base" if lr_base != 1.0 else "embed_lr_new")
        raise ConfigError(f"config: {key} needs the base vocab size that `zhllama vocab resize` records in "
                          f"{cfg.model}/config.json ({BASE_VOCAB_KEY}); this model was not resized by zhllama")
    model = adapters.apply_stage(model, preset, split_rows_at=base_vocab or None, train_base_rows=lr_base > 0)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # always: a KV cache would let packed SFT examples attend across examples
    return model, tokenizer, tokenizer_path


# ----------------------------------------------------------------------------- metrics

class Metrics:
    """Rank 0's outputs: a progress line, metrics.jsonl and TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():  # drop records of steps after the checkpoint we resume from
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; metrics go to metrics.jsonl only")

    def write(self, record: dict):
        if not self.enabled:
            return
        record = json_safe(record)  # null, never Infinity or NaN: those are not JSON
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, record["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------- the loop

@dataclass
class _Run:
    """What `Trainer._setup` builds and the step loop uses."""
    engine: object                  # the DeepSpeed engine around CausalLMTokenLoss(model)
    scheduler: object
    order: object                   # position -> block id: the mixture's order, or a BlockOrder (sft)
    metrics: Metrics
    precision: str
    grad_accum: int
    start_step: int
    total_steps: int
    trainable: int
    total: int
    groups: dict                    # trainable parameters per optimizer group (row_groups.GROUPS)
    ckpt_root: Path
    fingerprint: str
    data_fingerprint: Optional[dict]  # recorded in checkpoints; a resume on other data is refused
    tokenizer_path: str             # cfg.tokenizer or cfg.model
    mfu: MFUMeter


class Trainer:
    def __init__(self, cfg: RunConfig, allow_config_change: bool = False, hooks: Optional[TrainHooks] = None,
                 allow_data_change: bool = False):
        self.cfg = cfg
        self.hooks = hooks or TrainHooks()  # tests' crash and NaN injection points (pretrain/hooks.py)
        self.allow_config_change = allow_config_change  # resume even if the config differs from the checkpoint's
        self.allow_data_change = allow_data_change  # resume even if the data's fingerprint differs
        self.preset = cfg.preset()
        self.run_dir = Path(cfg.out)

    def run(self) -> dict:
        """Set up, run the steps from the resume point to the end, save the final adapter."""
        cfg = self.cfg
        run = self._setup()
        summary = {"start_step": run.start_step, "total_steps": run.total_steps, "trainable": run.trainable,
                   "total": run.total, "nonfinite_skipped": 0, "versions": self.versions,
                   "gradient_checkpointing": self.checkpointing, "mfu_peak": self.mfu_basis}
        nonfinite_in_row = 0
        last = {}

        for step in range(run.start_step, run.total_steps):
            record, nonfinite = self._step_and_record(run, step)
            done = step + 1
            if nonfinite:
                summary["nonfinite_skipped"] += nonfinite
                nonfinite_in_row += 1
                if nonfinite_in_row >= cfg.max_nonfinite_steps:
                    raise UserError(self._nonfinite_diagnosis(step, nonfinite_in_row, last))
            else:
                nonfinite_in_row = 0
                last = record
            if self.hooks.poisons_weights(done, self.rank):
                self._poison_weights()
            if done % cfg.save_every == 0 or done == run.total_steps:
                self._save_checkpoint(run, done, last)
            self.hooks.call_after_step(done, self.rank)

        run.metrics.close()
        summary.update(json_safe({k: last.get(k) for k in ("loss", "val_loss", "tokens_per_s", "mfu")}))
        summary.update(json_safe(self._mixture_summary(run)))
        self._save_final(run.engine, run.tokenizer_path)
        return summary

    def _mixture_summary(self, run: "_Run") -> dict:
        """summary.json's trainable groups, each source's share of the sequences and its first and last
        validation figures (from metrics.jsonl, so a resumed run reports its whole history)."""
        out = {"trainable_groups": run.groups}
        mixture = self.data.mixture
        if mixture is not None:
            shares = mixture.shares(run.total_steps)
            out["sources"] = {s.name: {"weight": float(s.weight), "share": shares.get(s.name, 0.0)}
                              for s in mixture.sources}
            if self.rank == 0:
                for name, figures in first_and_last(run.metrics.path).items():
                    out["sources"].setdefault(name, {})["validation"] = figures
        return out

    # setup ---------------------------------------------------------------------------------------
    def _setup(self) -> "_Run":
        """Everything before the first step, ordered to fail early: config errors before any process
        group, a refused resume (it reads only the checkpoint's JSON) before the model is loaded."""
        cfg, preset = self.cfg, self.preset
        # Library versions, then config errors, before any process group, model or data is touched.
        check_versions()
        self.versions = versions_record()
        grad_accumulation(preset.global_batch, cfg.micro_batch, int(os.environ.get("WORLD_SIZE", 1)))
        ds_path = resolve_ds_config(stage_ds_config(cfg.stage, cfg.ds_config))
        rank, world, local_rank = init_distributed()
        self.rank, self.world = rank, world
        if rank == 0:
            log.info("versions: %s", versions_line(self.versions))
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        precision = choose_precision(cfg.precision, device)
        grad_accum = grad_accumulation(preset.global_batch, cfg.micro_batch, world)
        ds_config = build_ds_config(ds_path, global_batch=preset.global_batch, micro_batch=cfg.micro_batch,
                                    grad_accum=grad_accum, grad_clip=preset.grad_clip, precision=precision)
        torch.manual_seed(cfg.seed)

        # Resume checks read only the checkpoint's JSON and the data's manifests (or input files): a
        # changed config or data set is refused before the model is loaded. Global rank 0 chooses the
        # checkpoint; every rank takes its choice.
        ckpt_root = self.run_dir / "checkpoints"
        latest = checkpoint.choose_resume(ckpt_root, rank=rank, broadcast=lambda step: broadcast_from_rank0(
            step, device)) if cfg.resume else None
        fingerprint = checkpoint.model_fingerprint(cfg.model)
        data_fingerprint = None
        if latest is not None:
            checkpoint.check_resume(latest, cfg, world, fingerprint, self.allow_config_change)
            data_fingerprint = checkpoint.data_fingerprint(cfg)
            if not (self.allow_config_change or self.allow_data_change):
                checkpoint.check_data(latest, data_fingerprint)

        self.rope_change = rope.for_run(cfg)   # read from config.json; a bad request fails before loading
        if self.rope_change is not None and rank == 0:
            log.info("positions: %s, from %s", self.rope_change.after.describe(), self.rope_change.before.describe())
        self.checkpointing, why = decide_gradient_checkpointing(
            cfg.gradient_checkpointing, cfg=cfg, preset=preset, world=world, device=device, ds_path=ds_path)
        if rank == 0:
            log.info("gradient checkpointing %s: %s", "on" if self.checkpointing else "off", why)
        model, tokenizer, tokenizer_path = build_model(cfg, preset, torch_dtype(precision), self.checkpointing,
                                                        self.rope_change)
        data = build_data(cfg, preset, tokenizer, tokenizer_path)
        if data_fingerprint is None:
            data_fingerprint = checkpoint.data_fingerprint(cfg)
        trainable, total = adapters.count_trainable(model)
        groups = row_groups.trainable_groups(model)
        total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(data.train) / preset.global_batch))
        self.source_validation = (
            SourceValidation(data.mixture.sources, preset.block_size, rank, world, pad_id(tokenizer), cfg.micro_batch)
            if data.mixture is not None else None)
        if rank == 0:
            self._start_run_dir(data, grad_accum, total_steps, precision, trainable, total, groups, ds_path)

        engine, scheduler = self._deepspeed_engine(model, ds_config, total_steps)
        start_step = 0
        if latest is not None:
            state = checkpoint.load(engine, latest, rank=rank, world=world)
            start_step = state["step"]
            if rank == 0:
                log.info("resumed from %s (step %d of %d)", latest, start_step, total_steps)

        order = data.mixture.order if data.mixture is not None else BlockOrder(len(data.train), cfg.seed)
        metrics = Metrics(self.run_dir, rank == 0, cfg.tensorboard, start_step)
        hf_config = getattr(model, "get_base_model", lambda: model)().config
        fpt = flops_per_token(hf_config, preset.block_size, trainable_matmul_params(model), adapter_matmul_params(model))
        device_peak, self.mfu_basis = peak_flops(device)
        meter = MFUMeter(fpt, device_peak, world, measured=device.type != "cuda")
        self.engine, self.data, self.device = engine, data, device
        return _Run(engine=engine, scheduler=scheduler, order=order, metrics=metrics, precision=precision,
                    grad_accum=grad_accum, start_step=start_step, total_steps=total_steps, trainable=trainable,
                    total=total, groups=groups, ckpt_root=ckpt_root, fingerprint=fingerprint,
                    data_fingerprint=data_fingerprint, tokenizer_path=tokenizer_path, mfu=meter)

    def _start_run_dir(self, data, grad_accum, total_steps, precision, trainable, total, groups, ds_path):
        """Rank 0: config.yaml and the stage's run files (sft: template.json), and the run's one-line plan."""
        cfg, preset = self.cfg, self.preset
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", dump_config(cfg))
        stage_data = registered(cfg.stage)
        for name, obj in (stage_data.run_files(cfg) if stage_data and stage_data.run_files else {}).items():
            atomic_write_json(self.run_dir / name, obj)  # sft: template.json, the template itself
        log.info("stage %s | %s | world %d x micro %d x accum %d = global batch %d | %d steps | "
                 "precision %s | trainable %s of %s (%.2f%%: %s) | ds config %s", cfg.stage, data.description,
                 self.world, cfg.micro_batch, grad_accum, preset.global_batch, total_steps, precision,
                 f"{trainable:,}", f"{total:,}", 100.0 * trainable / total, row_groups.describe_groups(groups),
                 ds_path.name)
        lr_base, lr_new = cfg.row_lr_scales()
        if "base_rows" in groups or "new_rows" in groups or lr_base == 0:
            log.info("vocabulary rows: base rows at %s x lr, new rows at %s x lr", "0 (frozen)" if lr_base == 0
                     else f"{lr_base:g}", f"{lr_new:g}")
        for line in self.source_validation.describe() if self.source_validation is not None else ():
            log.info(line)

    def _deepspeed_engine(self, model, ds_config, total_steps):
        """(engine, scheduler): AdamW (DeepSpeed's CPU Adam when the optimizer is offloaded) on the
        trainable parameters, the warmup + cosine schedule, and DeepSpeed around the loss module."""
        import deepspeed

        preset = self.preset
        # One group per kind of trainable parameter (LoRA, the base's vocabulary rows, the new rows), each with
        # its lr as a multiple of the stage lr (pretrain/row_groups.py); LambdaLR scales every group alike.
        lr_base, lr_new = self.cfg.row_lr_scales()
        params = row_groups.param_groups(model, preset.lr, base_scale=lr_base, new_scale=lr_new)
        if ds_config.get("zero_optimization", {}).get("offload_optimizer"):
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            optimizer = DeepSpeedCPUAdam(params, lr=preset.lr, betas=preset.betas,
                                         weight_decay=preset.weight_decay, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(params, lr=preset.lr, betas=preset.betas,
                                          weight_decay=preset.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(total_steps, preset.warmup_ratio, self.cfg.min_lr_ratio))
        # DeepSpeed wraps the loss module: its forward returns the summed token loss (zhllama/loss.py).
        engine, _, _, _ = deepspeed.initialize(model=CausalLMTokenLoss(model), optimizer=optimizer,
                                               lr_scheduler=scheduler, config=ds_config)
        checked = assert_fp32_buffers(engine.module)  # rotary inv_freq: an old DeepSpeed casts it to bf16
        if self.rank == 0:
            log.info("rotary buffers float32 after deepspeed.initialize: %d checked", checked)
        return engine, scheduler

    # one step and its record -----------------------------------------------------------------------
    def _step_and_record(self, run: "_Run", step: int):
        """Train one step, then its record: metrics.jsonl, the progress line, and the validation loss
        every eval_every steps and at the last one. Returns (record, non-finite micro-batches)."""
        cfg, engine = self.cfg, run.engine
        engine.train()
        lr = run.scheduler.get_last_lr()[0] / run.scheduler.optimizer.param_groups[0]["lr_scale"]  # the stage lr
        t0 = time.perf_counter()
        loss, tokens, nonfinite = self._train_step(step, run.order, run.grad_accum)
        dt = time.perf_counter() - t0
        done = step + 1
        record = {"step": done, "loss": loss if math.isfinite(loss) else None, "lr": lr,
                  "grad_norm": finite_or_none(engine.get_global_grad_norm()), "tokens_per_s": tokens / dt,
                  "mfu": run.mfu(tokens, dt), "step_time_s": dt, "tokens": tokens,
                  "nonfinite_microbatches": nonfinite}
        if run.precision == "fp16":
            record["loss_scale"] = finite_or_none(getattr(engine.optimizer, "cur_scale", None))
        mixture = self.data.mixture
        if mixture is not None and len(mixture.trained) > 1:   # the sequences each source got in this step
            record.update({f"sequences/{name}": n for name, n in mixture.step_counts(step).items()})
        validates = self.data.validation is not None or bool(self.source_validation)
        if validates and ((cfg.eval_every and done % cfg.eval_every == 0) or done == run.total_steps):
            record.update(self.evaluate())
        if self.rank == 0:
            run.metrics.write(record)
            if done % cfg.log_every == 0 or done == run.total_steps or nonfinite:
                shares = mixture.shares(done) if mixture is not None and len(mixture.trained) > 1 else None
                log.info(_progress_line(record, run.total_steps, shares))
        return record, nonfinite

    # one optimizer step --------------------------------------------------------------------------
    def _train_step(self, step, order, grad_accum):
        """Forward/backward over this rank's micro-batches, then the optimizer step (at the boundary).

        Two collectives per step, both through `_reduce` (on the engine's device): the global token
        count before the first forward (the loss denominator), and (loss sum, non-finite micro-batches)
        after the last backward. Nothing is read back to the host in between. A non-finite loss is
        backpropagated like any other: DeepSpeed's overflow check then skips the optimizer step on
        every rank alike, and the step is reported as skipped.
        """
        cfg, engine = self.cfg, self.engine
        positions = positions_for_rank(step, self.preset.global_batch, self.rank, self.world)
        items = [self.data.train[order.index(p)] for p in positions]
        micro = [self.data.collate(items[i:i + cfg.micro_batch]) for i in range(0, len(items), cfg.micro_batch)]
        assert len(micro) == grad_accum
        # The global number of predicted tokens, known before any forward: the loss denominator.
        # Counted on the host-side batches (no device sync), summed over ranks once.
        target_tokens, seen_tokens = self._reduce([
            sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro),
            sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in micro)])
        # DeepSpeed averages gradients over ranks, hence x world: sum / global tokens overall.
        scale = self.world / max(target_tokens, 1.0)
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # (token loss sum, non-finite micro-batches)
        for batch in micro:
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            token_loss = engine(**batch)
            if self.hooks.poisons(step + 1, self.rank):
                token_loss = token_loss * float("nan")
            engine.backward(token_loss * scale, scale_wrt_gas=False)
            finite = torch.isfinite(token_loss.detach())
            sums += torch.stack([torch.where(finite, token_loss.detach(), 0.0).double(), (~finite).double()])
            engine.step()
        loss_sum, nonfinite = self._reduce(sums)
        nonfinite = int(nonfinite)
        loss = loss_sum / max(target_tokens, 1.0) if not nonfinite else float("nan")
        return loss, seen_tokens, nonfinite

    def _reduce(self, values) -> list:
        """Sum `values` (numbers or a tensor) over ranks on the engine's device; the step's one host read.

        Every collective of the loop goes through here, so a CPU tensor never reaches NCCL."""
        if not torch.is_tensor(values):
            values = torch.tensor(values, dtype=torch.float64, device=self.device)
        values = values.to(self.device, torch.float64)
        all_reduce_(values)
        return self._to_host(values)

    @staticmethod
    def _to_host(t) -> list:
        return t.tolist()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """`val_loss`: token-weighted loss over the first eval_batches micro-batches per rank of the validation
        blocks (of each source of a mixture, pooled); and each source's validation documents scored on their own
        (`val_loss/<source>`, `val_bits_per_char/<source>`: pretrain/source_eval.py)."""
        cfg, engine, val = self.cfg, self.engine, self.data.validation
        sources = getattr(self, "source_validation", None) or ()
        engine.eval()
        # (loss sum, tokens) of the blocks, then of each source's documents: one all-reduce for all of them.
        sums = torch.zeros(2 * (1 + len(sources)), dtype=torch.float64, device=self.device)
        for split in (val if isinstance(val, tuple) else (val,)) if val is not None else ():
            n = min(len(split), cfg.eval_batches * cfg.micro_batch * self.world)
            for start in range(self.rank * cfg.micro_batch, n, cfg.micro_batch * self.world):
                items = [split[i] for i in range(start, min(start + cfg.micro_batch, n))]
                sums[0:2] += self._scored(self.data.collate(items))
        for k, batch in sources.batches() if sources else ():
            sums[2 * (k + 1):2 * (k + 2)] += self._scored(batch)
        reduced = self._reduce(sums)
        pairs = list(zip(reduced[0::2], reduced[1::2]))
        engine.train()
        out = {}
        if val is not None:
            val_loss = pairs[0][0] / max(pairs[0][1], 1.0)
            out.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
        if sources:
            out.update(sources.figures(pairs[1:]))
        return out

    def _scored(self, batch):
        """(summed token loss, predicted tokens) of one batch, on the engine's device (no host read)."""
        tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # host-side labels: no device sync
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        loss = self.engine(**batch).double()
        return torch.stack([loss, loss.new_tensor(float(tokens))])

    def _save_checkpoint(self, run: "_Run", done: int, last: dict) -> None:
        """checkpoint.save with this run's state; weights that are not finite on some rank stop the run
        before anything is written (the last complete checkpoint stays the one to resume from)."""
        try:
            checkpoint.save(run.engine, run.ckpt_root, done,
                            checkpoint.run_state(self.cfg, done, self.world, run.fingerprint, run.data_fingerprint),
                            rank=self.rank, barrier=barrier, keep_last=self.cfg.keep_last,
                            crash_hook=lambda: self.hooks.call_in_checkpoint(done, self.rank),
                            agree=lambda message: first_message(message, self.device))
        except checkpoint.NonFiniteWeights as e:
            log.error("step %d: %s", done, e)
            raise UserError(f"stopped at step {done}: {e}. Last finite record: {last or 'none'}. {_LIKELY_CAUSES}. "
                            "A rerun resumes from the last complete checkpoint") from None

    def _poison_weights(self):
        """Test seam (ZHLLAMA_NAN_WEIGHTS): this rank's trainable weights become NaN, as after an update that
        DeepSpeed's overflow check let through."""
        with torch.no_grad():
            for p in self.engine.module.parameters():
                if p.requires_grad:
                    p.fill_(float("nan"))

    def _save_final(self, engine, tokenizer_path):
        final = self.run_dir / "final"
        if self.rank == 0:
            adapters.save_adapter(engine.module.model, final, tokenizer_dir=tokenizer_path, run_config=_run_record(self.cfg, self.rope_change),
                         overwrite=True)
            log.info("final adapter written to %s", final)
        barrier()

    def _nonfinite_diagnosis(self, step, n, last) -> str:
        return (f"stopped at step {step + 1}: the loss was non-finite in {n} steps in a row "
                f"(max_nonfinite_steps={self.cfg.max_nonfinite_steps}). Last finite record: {last or 'none'}. "
                f"{_LIKELY_CAUSES}. The last complete checkpoint is intact; the run resumes from it.")


_LIKELY_CAUSES = ("Likely causes: lr too high for this stage (try lr=5e-5), fp16 overflow (use bf16 on A100/H100, "
                  "or precision=fp32 to check), or corrupt data (re-run `zhllama data pack`)")


def _progress_line(r: dict, total: int, shares: Optional[dict] = None) -> str:
    loss = f"loss {r['loss']:.4f}" if r["loss"] is not None else "loss non-finite (step skipped)"
    parts = [f"step {r['step']}/{total}", loss, f"lr {r['lr']:.2e}"]
    if r.get("grad_norm") is not None:
        parts.append(f"gnorm {r['grad_norm']:.3f}")
    mfu = f"MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "MFU unknown"
    parts += [f"{r['tokens_per_s']:,.0f} tok/s", mfu, f"{r['step_time_s']:.2f} s/step"]
    if r.get("loss_scale") is not None:
        parts.append(f"scale {r['loss_scale']:g}")
    if "val_loss" in r:
        parts.append(f"val_loss {r['val_loss']:.4f} (ppl {r['val_ppl']:.2f})")
    for key in r:
        if key.startswith("val_loss/"):
            name = key[len("val_loss/"):]
            bpc = r.get(f"val_bits_per_char/{name}")
            parts.append(f"val {name} {r[key]:.4f}" + (f" ({bpc:.4f} bits/char)" if bpc is not None else ""))
    if shares:
        parts.append("mix " + " ".join(f"{name} {100 * share:.1f}%" for name, share in shares.items()))
    if r.get("nonfinite_microbatches"):
        parts.append(f"skipped {r['nonfinite_microbatches']} non-finite micro-batches")
    return " | ".join(parts)
