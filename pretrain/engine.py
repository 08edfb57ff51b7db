"""The training loop, on the DeepSpeed engine (ZeRO-2), for every stage.

We drive the engine ourselves (as DeepSpeed-Chat does) instead of going through HF Trainer, because
three things must be exactly right and stay ours:

* the global batch: `global_batch` sequences per optimizer step whatever the world size; rank r of W
  takes a contiguous slice of the step's sample positions, cut into micro-batches;
* the loss: token-weighted over the whole global batch (sum of token losses / tokens in the global
  batch), so 1 rank and 2 ranks compute the same update, and SFT examples of different lengths weigh
  by their tokens, not by their micro-batch;
* the data position and the checkpoint: the sample order is a pure function of (seed, position), so
  resuming at step k replays exactly what an uninterrupted run would have seen.
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
from zhllama.hosts import free_port
from zhllama.log import get_logger
from zhllama.loss import IGNORE_INDEX, CausalLMTokenLoss
from zhllama.modelio import BASE_VOCAB_KEY, load_model, load_tokenizer
from zhllama.schedule import lr_lambda

from . import adapters, checkpoint, rope
from .config import RunConfig, dump_config
from .flops import flops_per_token, peak_flops
from .hooks import TrainHooks
from .presets import grad_accumulation
from .shards import BlockOrder, PackedBlocks, positions_for_rank
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
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_(tensor, op=None):
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=op or torch.distributed.ReduceOp.SUM)
    return tensor


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


# ----------------------------------------------------------------------------- DeepSpeed config

def resolve_ds_config(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".json" or p.exists():
        if not p.is_file():
            raise ConfigError(f"config: ds_config '{name_or_path}' not found")
        return p
    from importlib import resources
    candidate = resources.files("zhllama.ds_configs") / f"{name_or_path}.json"
    if not candidate.is_file():
        raise ConfigError(f"config: ds_config '{name_or_path}' is neither a JSON file nor one of "
                          f"zero2, zero2_offload")
    return Path(str(candidate))


def build_ds_config(path: Path, *, global_batch, micro_batch, grad_accum, grad_clip, precision) -> dict:
    """The DeepSpeed JSON with every 'auto' filled from the run config."""
    cfg = json.loads(Path(path).read_text())
    cfg.pop("_comment", None)
    cfg["train_batch_size"] = global_batch
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["gradient_clipping"] = grad_clip
    cfg.setdefault("bf16", {})["enabled"] = precision == "bf16"
    cfg.setdefault("fp16", {})["enabled"] = precision == "fp16"
    if precision != "fp16":
        cfg.pop("fp16")
    if not torch.cuda.is_available():
        # overlap_comm needs CUDA streams; on CPU it only adds copies.
        cfg.get("zero_optimization", {})["overlap_comm"] = False
    return cfg


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
    stage_data = registered(cfg.stage, required=cfg.stage == "sft")
    if stage_data is not None:
        return stage_data.build(cfg, preset, tokenizer)
    if len(cfg.data) != 1:
        raise ConfigError("config: key 'data' must name exactly one `zhllama data pack` directory for "
                          f"stage {cfg.stage}, got {len(cfg.data)}")
    train = PackedBlocks(cfg.data[0], "train", expect_tokenizer=tokenizer_path,
                         expect_block_size=preset.block_size)
    if len(train) == 0:
        raise UserError(f"{cfg.data[0]}: the training split holds no block")
    try:
        val = PackedBlocks(cfg.data[0], "validation", expect_tokenizer=tokenizer_path,
                           expect_block_size=preset.block_size)
        val = val if len(val) else None
    except UserError:
        val = None
    return Data(train, val, _collate_blocks,
                f"{len(train):,} blocks of {preset.block_size} tokens from {cfg.data[0]}")


# ----------------------------------------------------------------------------- model

def build_model(cfg: RunConfig, preset, dtype, rope_change=None):
    tokenizer_path = cfg.tokenizer or cfg.model
    tokenizer = load_tokenizer(tokenizer_path)
    model = load_model(cfg.model, dtype=dtype, tokenizer_path=tokenizer_path,
                       config=rope.hf_config(cfg.model, rope_change))
    if cfg.init_adapters:  # earlier stages' final/ dirs, folded into the weights in order
        log.info("merging earlier stages' adapters: %s", ", ".join(cfg.init_adapters))
        model = adapters.merge_adapters(model, cfg.init_adapters)
    new_rows_from = None
    if cfg.new_rows_only:
        new_rows_from = getattr(model.config, BASE_VOCAB_KEY, None)
        if not new_rows_from:
            raise ConfigError(f"config: new_rows_only needs the base vocab size that `zhllama vocab resize` "
                              f"records in {cfg.model}/config.json ({BASE_VOCAB_KEY}); this model was not "
                              "resized by zhllama")
    model = adapters.apply_stage(model, preset, new_rows_from=new_rows_from)
    if cfg.gradient_checkpointing:
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
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
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
    order: BlockOrder
    metrics: Metrics
    precision: str
    grad_accum: int
    start_step: int
    total_steps: int
    trainable: int
    total: int
    ckpt_root: Path
    fingerprint: str
    tokenizer_path: str             # cfg.tokenizer or cfg.model
    flops_per_token: float
    peak_flops: float


class Trainer:
    def __init__(self, cfg: RunConfig, allow_config_change: bool = False, hooks: Optional[TrainHooks] = None):
        self.cfg = cfg
        self.hooks = hooks or TrainHooks()  # tests' crash and NaN injection points (pretrain/hooks.py)
        self.allow_config_change = allow_config_change  # resume even if the config differs from the checkpoint's
        self.preset = cfg.preset()
        self.run_dir = Path(cfg.out)

    def run(self) -> dict:
        """Set up, run the steps from the resume point to the end, save the final adapter."""
        cfg = self.cfg
        run = self._setup()
        summary = {"start_step": run.start_step, "total_steps": run.total_steps, "trainable": run.trainable,
                   "total": run.total, "nonfinite_skipped": 0}
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
            if done % cfg.save_every == 0 or done == run.total_steps:
                checkpoint.save(run.engine, run.ckpt_root, done,
                                checkpoint.run_state(cfg, done, self.world, run.fingerprint),
                                rank=self.rank, barrier=barrier, keep_last=cfg.keep_last,
                                crash_hook=lambda: self.hooks.call_in_checkpoint(done, self.rank))
            self.hooks.call_after_step(done, self.rank)

        run.metrics.close()
        summary.update({k: last.get(k) for k in ("loss", "val_loss", "tokens_per_s", "mfu")})
        self._save_final(run.engine, run.tokenizer_path)
        return summary

    # setup ---------------------------------------------------------------------------------------
    def _setup(self) -> "_Run":
        """Everything before the first step, ordered to fail early: config errors before any process
        group, a refused resume (it reads only the checkpoint's JSON) before the model is loaded."""
        cfg, preset = self.cfg, self.preset
        # Config errors first, before any process group, model or data is touched.
        grad_accumulation(preset.global_batch, cfg.micro_batch, int(os.environ.get("WORLD_SIZE", 1)))
        ds_path = resolve_ds_config(cfg.ds_config)
        rank, world, local_rank = init_distributed()
        self.rank, self.world = rank, world
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        precision = choose_precision(cfg.precision, device)
        grad_accum = grad_accumulation(preset.global_batch, cfg.micro_batch, world)
        ds_config = build_ds_config(ds_path, global_batch=preset.global_batch, micro_batch=cfg.micro_batch,
                                    grad_accum=grad_accum, grad_clip=preset.grad_clip, precision=precision)
        torch.manual_seed(cfg.seed)

        # Resume checks read only the checkpoint's JSON: a changed world size or config is refused
        # before the model is loaded.
        ckpt_root = self.run_dir / "checkpoints"
        latest = checkpoint.latest_checkpoint(ckpt_root) if cfg.resume else None
        fingerprint = checkpoint.model_fingerprint(cfg.model)
        if latest is not None:
            checkpoint.check_resume(latest, cfg, world, fingerprint, self.allow_config_change)

        self.rope_change = rope.for_run(cfg)   # read from config.json; a bad request fails before loading
        if self.rope_change is not None and rank == 0:
            log.info("positions: %s, from %s", self.rope_change.after.describe(), self.rope_change.before.describe())
        model, tokenizer, tokenizer_path = build_model(cfg, preset, torch_dtype(precision), self.rope_change)
        data = build_data(cfg, preset, tokenizer, tokenizer_path)
        trainable, total = adapters.count_trainable(model)
        total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(data.train) / preset.global_batch))
        if rank == 0:
            self._start_run_dir(data, grad_accum, total_steps, precision, trainable, total, ds_path)

        engine, scheduler = self._deepspeed_engine(model, ds_config, total_steps)
        start_step = 0
        if latest is not None:
            state = checkpoint.load(engine, latest, rank=rank)
            start_step = state["step"]
            if rank == 0:
                log.info("resumed from %s (step %d of %d)", latest, start_step, total_steps)

        order = BlockOrder(len(data.train), cfg.seed)
        metrics = Metrics(self.run_dir, rank == 0, cfg.tensorboard, start_step)
        hf_config = getattr(model, "get_base_model", lambda: model)().config
        fpt = flops_per_token(hf_config, preset.block_size)
        peak = peak_flops(device) * world
        self.engine, self.data, self.device = engine, data, device
        return _Run(engine=engine, scheduler=scheduler, order=order, metrics=metrics, precision=precision,
                    grad_accum=grad_accum, start_step=start_step, total_steps=total_steps, trainable=trainable,
                    total=total, ckpt_root=ckpt_root, fingerprint=fingerprint, tokenizer_path=tokenizer_path,
                    flops_per_token=fpt, peak_flops=peak)

    def _start_run_dir(self, data, grad_accum, total_steps, precision, trainable, total, ds_path):
        """Rank 0: config.yaml and the stage's run files (sft: template.json), and the run's one-line plan."""
        cfg, preset = self.cfg, self.preset
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", dump_config(cfg))
        stage_data = registered(cfg.stage)
        for name, obj in (stage_data.run_files(cfg) if stage_data and stage_data.run_files else {}).items():
            atomic_write_json(self.run_dir / name, obj)  # sft: template.json, the template itself
        log.info("stage %s | %s | world %d x micro %d x accum %d = global batch %d | %d steps | "
                 "precision %s | trainable %s of %s (%.2f%%) | ds config %s", cfg.stage, data.description,
                 self.world, cfg.micro_batch, grad_accum, preset.global_batch, total_steps, precision,
                 f"{trainable:,}", f"{total:,}", 100.0 * trainable / total, ds_path.name)

    def _deepspeed_engine(self, model, ds_config, total_steps):
        """(engine, scheduler): AdamW (DeepSpeed's CPU Adam when the optimizer is offloaded) on the
        trainable parameters, the warmup + cosine schedule, and DeepSpeed around the loss module."""
        import deepspeed

        preset = self.preset
        params = [p for p in model.parameters() if p.requires_grad]
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
        return engine, scheduler

    # one step and its record -----------------------------------------------------------------------
    def _step_and_record(self, run: "_Run", step: int):
        """Train one step, then its record: metrics.jsonl, the progress line, and the validation loss
        every eval_every steps and at the last one. Returns (record, non-finite micro-batches)."""
        cfg, engine = self.cfg, run.engine
        engine.train()
        lr = run.scheduler.get_last_lr()[0]
        t0 = time.perf_counter()
        loss, tokens, nonfinite = self._train_step(step, run.order, run.grad_accum)
        dt = time.perf_counter() - t0
        done = step + 1
        record = {"step": done, "loss": loss if math.isfinite(loss) else None, "lr": lr,
                  "grad_norm": _float(engine.get_global_grad_norm()), "tokens_per_s": tokens / dt,
                  "mfu": run.flops_per_token * tokens / dt / run.peak_flops, "step_time_s": dt, "tokens": tokens,
                  "nonfinite_microbatches": nonfinite}
        if run.precision == "fp16":
            record["loss_scale"] = _float(getattr(engine.optimizer, "cur_scale", None))
        if cfg.eval_every and done % cfg.eval_every == 0 and self.data.validation is not None:
            record.update(self.evaluate())
        if done == run.total_steps and self.data.validation is not None and "val_loss" not in record:
            record.update(self.evaluate())
        if self.rank == 0:
            run.metrics.write(record)
            if done % cfg.log_every == 0 or done == run.total_steps or nonfinite:
                log.info(_progress_line(record, run.total_steps))
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
        """Token-weighted loss over the first eval_batches micro-batches per rank of the validation split."""
        cfg, engine, val = self.cfg, self.engine, self.data.validation
        engine.eval()
        n = min(len(val), cfg.eval_batches * cfg.micro_batch * self.world)
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for start in range(self.rank * cfg.micro_batch, n, cfg.micro_batch * self.world):
            batch = self.data.collate([val[i] for i in range(start, min(start + cfg.micro_batch, n))])
            tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            sums += torch.stack([engine(**batch).double(), sums.new_tensor(float(tokens))])
        loss_sum, tokens = self._reduce(sums)
        engine.train()
        val_loss = loss_sum / max(tokens, 1.0)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

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
                "Likely causes: lr too high for this stage (try lr=5e-5), fp16 overflow (use bf16 on "
                "A100/H100, or precision=fp32 to check), or corrupt data (re-run `zhllama data pack`). "
                "The last complete checkpoint is intact; the run resumes from it.")


def _float(x):
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _progress_line(r: dict, total: int) -> str:
    loss = f"loss {r['loss']:.4f}" if r["loss"] is not None else "loss non-finite (step skipped)"
    parts = [f"step {r['step']}/{total}", loss, f"lr {r['lr']:.2e}"]
    if r.get("grad_norm") is not None:
        parts.append(f"gnorm {r['grad_norm']:.3f}")
    parts += [f"{r['tokens_per_s']:,.0f} tok/s", f"MFU {100 * r['mfu']:.1f}%", f"{r['step_time_s']:.2f} s/step"]
    if r.get("loss_scale") is not None:
        parts.append(f"scale {r['loss_scale']:g}")
    if "val_loss" in r:
        parts.append(f"val_loss {r['val_loss']:.4f} (ppl {r['val_ppl']:.2f})")
    if r.get("nonfinite_microbatches"):
        parts.append(f"skipped {r['nonfinite_microbatches']} non-finite micro-batches")
    return " | ".join(parts)
