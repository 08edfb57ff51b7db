"""Plan a run before renting the GPUs: trainable parameters, memory per GPU, FLOPs and GPU-hours.

Trainable parameters are counted on the real module structure: the model is built with transformers on
the meta device (no memory), its embeddings resized to the vocabulary, the stage applied with the same
`apply_stage` the trainer uses, and the parameters counted, per optimizer group (the base's own vocabulary
rows, the rows the merge added, LoRA: pretrain/row_groups.py). The planner and the trainer cannot disagree.

Memory per GPU under DeepSpeed ZeRO-1/2 (bytes; P = all parameters and buffers of the staged model,
including PEFT's frozen copies, T = trainable parameters, N = GPUs, B = bucket elements):
  weights       2 P                    bf16/fp16, replicated on every GPU
  gradients     2 T / N  (ZeRO-2)      16-bit gradient partition kept by ZeRO-2;
                2 T      (ZeRO-1)      whole 16-bit gradients, accumulated on every rank
  buckets       2 x 2 min(T, B) x 4.5  reduce + allgather buckets (x4.5 with overlap_comm, DeepSpeed docs)
  optimizer     16 T / N               fp32 master weights, Adam m and v, fp32 gradient: partitioned
  activations   tokens x per-token     tokens = micro batch x sequence length, see `activation_bytes`;
                                       checked against what autograd saves on a real HF LLaMA; the
                                       loss is chunked as the engine computes it (zhllama/loss.py)
  grad_transient 2 x largest trainable a trained matrix's whole 16-bit gradient (lm_head, embed_tokens)
                                       exists before ZeRO copies it into a bucket and partitions it
  overhead      1 GiB                  CUDA context, NCCL buffers and cuBLAS workspaces
FLOPs per token: model FLOPs 4 N_mm + 2 T_mm + 12 L d s (`zhllama.pretrain.flops`, the MFU convention
of the training metrics: frozen weights cost no weight gradient).
Communication per GPU per optimizer step (bf16 gradients, ring collectives, each moving (N-1)/N of
its buffer): ZeRO-2 reduce-scatters the trainable gradients after every micro batch (A times a step,
A = gradient accumulation), ZeRO-1 once at the step's boundary; both all-gather the updated weights
once. ZeRO-2: (A + 1) x 2 T (N-1)/N bytes; ZeRO-1: 2 x 2 T (N-1)/N, for 2 T (1 - 1/N) more memory. GPU-hours = tokens x model FLOPs / (MFU x datasheet peak) / 3600, plus a reserve for
failures, restarts and evaluation. See docs/plan.md for the formulas and the LLaMA paper check.

  zhllama plan --model llama-7b --vocab-size 49953 --stage stage2 --tokens 20e9 --gpus 16 --gpu a100-80g
"""

import json
import math
from pathlib import Path

from zhllama import tiny
from zhllama.argtypes import float_range, int_range
from zhllama.errors import ConfigError, InputError, UserError
from zhllama.loss import chunk_tokens
from zhllama.model_config import DIMENSIONS, TRUST_REMOTE_CODE, check_model_config, read_config_json
from zhllama.modelio import BASE_VOCAB_KEY

from . import flops as flops_mod
from .adapters import apply_stage, count_trainable
from .config import RANGES
from .ds_config import resolve_ds_config, stage_ds_config
from .presets import STAGES, grad_accumulation
from .row_groups import describe_groups, largest_trained_matrix, trainable_groups

GIB = 1024 ** 3
DEFAULT_MFU = 0.40  # a well-tuned DeepSpeed ZeRO-2 run on A100s; the LLaMA paper's own stack implies 0.46-0.50
DEFAULT_RESERVE = 0.30  # BloombergGPT kept about 30% of its compute budget for failures and restarts
OVERHEAD_BYTES = 1 * GIB
HEADROOM = 0.90  # plan to use at most 90% of a GPU's memory (allocator fragmentation, spikes)
PLAN_STAGES = tuple(STAGES) + ("full",)  # full: every parameter trained (the LLaMA pretraining itself)

# Memory as nvidia-smi reports it (GiB) and bf16 support. Peak FLOP/s come from pretrain/flops.py.
GPUS = {
    "a100-40g": (40.0, True), "a100-80g": (80.0, True), "a800": (80.0, True),
    "h100": (79.6, True), "h800": (79.6, True), "h200": (140.4, True), "h20": (95.6, True),
    "l40s": (45.0, True), "a10": (22.5, True), "v100": (32.0, False), "v100-16g": (16.0, False),
    "4090": (24.0, True), "3090": (24.0, True),
}


# ------------------------------------------------------------------------------------------ the model

def model_config(spec: str, vocab_size=None, layers=None):
    """A transformers config from `llama-7b|13b|33b|65b`, `tiny`, or an HF config.json (file or dir),
    with `layers` decoder layers if given (e.g. a 7B-wide model of 2 layers, to check against a measurement)."""
    config = _model_config(spec, vocab_size)
    if layers is not None:
        if layers < 1:
            raise ConfigError(f"--layers must be >= 1, got {layers}")
        config.num_hidden_layers = layers
    return config


def _model_config(spec: str, vocab_size=None):

    key = spec.lower()
    if key in tiny.LLAMA_SHAPES:
        return tiny.llama_config(key, vocab_size or tiny.LLAMA_VOCAB)
    if key == "tiny":
        return tiny.tiny_llama_config(vocab_size or 512)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"--model {spec}: not a known shape ({', '.join(tiny.LLAMA_SHAPES)}, tiny) and no "
                        f"config.json at {path}")
    data = check_model_config(read_config_json(path), path)  # no code, every dimension in range
    if "model_type" not in data:
        raise InputError(path, "missing key 'model_type' (is this a transformers config.json?)")
    from transformers import AutoConfig
    try:
        return AutoConfig.for_model(**data)
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(path, f"transformers cannot build a config from it ({e})") from None


def staged_meta_model(config, vocab_size, stage, new_rows_from=None, preset=None, train_base_rows=True):
    """The model as training sees it, on the meta device: resized to `vocab_size`, stage applied
    (`preset`: a run's preset with its overrides, default the stage's). A grown vocabulary is split at the
    model's own size, as the trainer splits it at the base vocab size that `zhllama vocab resize` records
    (the base rows and the new rows: two optimizer groups)."""
    import torch
    from transformers import AutoModelForCausalLM


    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=TRUST_REMOTE_CODE)
    base_vocab = model.get_input_embeddings().weight.shape[0]
    if vocab_size and vocab_size != base_vocab:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)  # what `zhllama vocab resize` does
    if stage == "full":
        model.requires_grad_(True)
        return model
    grown = vocab_size is not None and vocab_size > base_vocab and new_rows_from is None
    if not train_base_rows and not grown:
        raise ConfigError("--embed-lr-base 0 freezes the base's rows: give --vocab-size larger than the model's "
                          f"own vocabulary ({base_vocab})")
    return apply_stage(model, preset or STAGES[stage], new_rows_from=new_rows_from,
                       split_rows_at=base_vocab if grown else None, train_base_rows=train_base_rows)


def _weight_elements(model) -> int:
    """Elements of every parameter and floating buffer, each counted once (PEFT copies included)."""
    seen, n = set(), 0
    for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel()
    return n


def activation_profile(model, full: bool) -> dict:
    """What decides the activation memory of a staged model: which weights train, and its LoRA layers."""
    from peft.tuners.lora import LoraLayer

    lora_in, lora_r = 0, 0
    for mod in model.modules():
        if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
            drop = mod.lora_dropout["default"]
            lora_in += mod.in_features * (3 if getattr(drop, "p", 0) > 0 else 2)  # dropout output + mask
            lora_r += 2 * mod.r["default"]
    head = model.get_output_embeddings()
    lm_head_trained = any(p.requires_grad for p in head.parameters()) if head is not None else False
    return {"full": full, "lora_bytes": lora_in + lora_r, "lm_head_trained": full or lm_head_trained}


# ------------------------------------------------------------------------------------------- formulas

def activation_bytes(config, tokens: int, checkpointing: bool, profile=None) -> dict:
    """Activation memory of one micro batch of `tokens` tokens (bf16 activations, SDPA attention, HF LLaMA).

    Bytes kept for the backward pass, per token and layer (h = d_model, i = MLP width):
      frozen layer   16h + 6i   fp32 inputs of both RMSNorms (8h); q, k, v and output of SDPA (8h);
                                SwiGLU: gate output, silu(gate), up output (6i)
      trained layer  26h + 8i   + normalised RMSNorm outputs (4h) and the inputs of the trained
                                matmuls: norm outputs, o_proj input (6h), down_proj input (2i)
      LoRA           3 in + 2r  per LoRA layer: dropout output and mask, lora_B input
    Head: the final RMSNorm's fp32 input (4h), lm_head's input (2h, kept by the loss), and the loss
    (`loss_bytes`). With gradient checkpointing a layer keeps only its input (2h) and one layer at a
    time is recomputed. `saved` is checked against the tensors autograd really saves (tests/test_plan.py).
    The peak adds to what is saved the larger of two moments of the backward: the loss's (first), and a
    layer's backward, which holds its recomputed activations (with checkpointing) and the MLP's gradients
    (8i: of the down_proj input, of silu(gate), of the up and gate outputs, 2i each). The second grows
    with the sequence and decides long-context runs (bench/loss_memory.py --checkpointing, issue 23).
    """
    profile = profile or {"full": True, "lora_bytes": 0, "lm_head_trained": True}
    h, i, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    layer = (26 * h + 8 * i) if profile["full"] else (16 * h + 6 * i)
    layer += profile["lora_bytes"] / L
    head = 4 * h + 2 * h + (2 * h if profile["full"] else 0)
    loss = loss_bytes(V, tokens)
    saved = tokens * ((L * 2 * h if checkpointing else L * layer) + head)
    peak = saved + max(loss["peak"], tokens * ((layer if checkpointing else 0) + 8 * i))
    return {"saved": int(saved + loss["saved"]), "peak": int(peak)}


def loss_bytes(vocab: int, tokens: int) -> dict:
    """Memory of the engine's token loss (`zhllama.loss.token_loss_sum`) over `tokens` positions.

    With a single chunk (tokens <= C = `chunk_tokens(V)`) the fp32 log-softmax (4V a position) is kept
    from the forward to the backward, which adds its gradient and the logits' gradient: 12V a position
    at the peak. With several chunks nothing of size V is kept; the backward recomputes one chunk at a
    time and peaks at 17.5V a chunk position (the recomputed chunk, the gradients and the exp() of the
    softmax backward). Both coefficients are measured (`python bench/loss_memory.py --loss-only`,
    checked in tests/test_plan.py); the fp32 copy of full logits beside the bf16 ones, 14V a position
    of the whole micro batch, is what the loss cost before it was chunked.
    """
    chunk = chunk_tokens(vocab)
    if tokens <= chunk:
        return {"saved": 4 * vocab * tokens, "peak": 12 * vocab * tokens}
    return {"saved": 0, "peak": int(17.5 * vocab * chunk)}


def recompute_flops_per_token(config, seq_len, checkpointing) -> float:
    """FLOPs gradient checkpointing adds per token: the layers' forward again (not lm_head), 2 N_layers + 4 L d s.
    Executed FLOPs = model FLOPs (`flops.flops_per_token`) + these."""
    if not checkpointing:
        return 0.0
    n_layers = flops_mod.matmul_params(config) - config.hidden_size * config.vocab_size
    return 2.0 * n_layers + 4.0 * config.num_hidden_layers * config.hidden_size * seq_len


def communication_per_step(trainable, gpus, grad_accumulation) -> dict:
    """Bytes each GPU sends per optimizer step under ZeRO-1 and ZeRO-2 (module docstring), and the
    memory ZeRO-1 holds beyond ZeRO-2 (whole 16-bit gradients instead of a 1/N partition)."""
    ring = 2.0 * trainable * (gpus - 1) / gpus  # one reduce-scatter or all-gather of the bf16 gradients
    accum = grad_accumulation or 1
    return {"zero2_bytes": (accum + 1) * ring, "zero1_bytes": 2 * ring, "grad_accumulation": accum,
            "zero1_extra_memory_bytes": 2.0 * trainable * (1 - 1 / gpus)}


def _ds_buckets(ds_config):
    """(bucket elements, overlap factor, optimizer offloaded, ZeRO stage) from a DeepSpeed JSON (a path
    or a name in ds_configs/, resolved as `zhllama train` does); DeepSpeed's defaults where unset."""
    path = resolve_ds_config(ds_config)
    try:
        zero = json.loads(path.read_text(encoding="utf-8")).get("zero_optimization", {})
    except (OSError, ValueError) as e:
        raise InputError(path, f"cannot read the DeepSpeed config ({e})") from None
    bucket = float(max(zero.get("reduce_bucket_size", 5e8), zero.get("allgather_bucket_size", 5e8)))
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    return bucket, (4.5 if zero.get("overlap_comm", False) else 1.0), offload, int(zero.get("stage", 0))


def memory_per_gpu(weights, trainable, gpus, act_bytes, bucket, overlap, offload=False, largest=0, zero_stage=2):
    """ZeRO-1/2 memory per GPU by component, in bytes (see the module docstring). With the optimizer
    offloaded, fp32 master weights and Adam moments live in host RAM, not on the GPU."""
    return {
        "weights": 2 * weights,
        "gradients": 2 * trainable / (gpus if zero_stage >= 2 else 1),
        "buckets": 2 * 2 * min(trainable, bucket) * overlap,
        "optimizer": 0.0 if offload else 16 * trainable / gpus,
        "activations": act_bytes,
        "grad_transient": 2 * largest,
        "overhead": OVERHEAD_BYTES,
    }


# ------------------------------------------------------------------------------------------------ plan

def plan(model="llama-7b", vocab_size=None, stage="stage2", tokens=20e9, gpus=16, gpu="a100-80g",
         mfu=DEFAULT_MFU, reserve=DEFAULT_RESERVE, micro_batch=None, seq_len=None, global_batch=None,
         new_rows_from=None, ds_config=None, layers=None, preset=None, embed_lr_base=1.0):
    """Everything `zhllama plan` prints, as a dict (`preset`: a run's preset with its overrides)."""
    if stage not in PLAN_STAGES:
        raise ConfigError(f"unknown stage '{stage}'; choose one of {', '.join(PLAN_STAGES)}")
    gpu_key = gpu.lower()
    if gpu_key not in GPUS:
        raise ConfigError(f"unknown GPU '{gpu}'; known: {', '.join(GPUS)}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
    if not 0 <= reserve < 10:
        raise ConfigError(f"--reserve must be a fraction >= 0 (0.3 = 30%), got {reserve}")
    if not (math.isfinite(embed_lr_base) and embed_lr_base >= 0):
        raise ConfigError(f"--embed-lr-base must be a number >= 0, got {embed_lr_base}")
    if not tokens > 0 or not gpus >= 1:
        raise ConfigError("--tokens and --gpus must be positive")
    mem_gib, has_bf16 = GPUS[gpu_key]
    peak = flops_mod.gpu_peak_flops(gpu_key)
    preset = preset or STAGES["stage2" if stage == "full" else stage]
    seq = seq_len or preset.block_size
    gbatch = global_batch or preset.global_batch

    config = model_config(model, layers=layers)
    staged = staged_meta_model(config, vocab_size, stage, new_rows_from, None if stage == "full" else preset,
                               train_base_rows=embed_lr_base > 0)
    config = staged.config if stage == "full" else staged.get_base_model().config
    trainable, total = count_trainable(staged) if stage != "full" else (
        sum(p.numel() for p in staged.parameters()),) * 2
    groups = trainable_groups(staged) if stage != "full" else {"other": trainable}
    weights = _weight_elements(staged)
    profile = activation_profile(staged, full=stage == "full")
    largest = largest_trained_matrix(staged)

    if stage == "full":
        model_fpt = flops_mod.flops_per_token(config, seq)
    else:
        model_fpt = flops_mod.flops_per_token(config, seq, flops_mod.trainable_matmul_params(staged),
                                              flops_mod.adapter_matmul_params(staged))
    exec_fpt = {ck: model_fpt + recompute_flops_per_token(config, seq, ck) for ck in (False, True)}
    seconds = tokens * model_fpt / (mfu * peak * gpus)
    gpu_hours = seconds * gpus / 3600
    budget_hours = gpu_hours * (1 + reserve)

    ds_name = stage_ds_config(stage, ds_config)
    bucket, overlap, offload, zero_stage = _ds_buckets(ds_name)
    divisible = [m for m in range(1, gbatch // gpus + 1) if gbatch % (m * gpus) == 0] if gbatch % gpus == 0 else []
    if micro_batch is not None:
        grad_accumulation(gbatch, micro_batch, gpus)  # ConfigError with valid choices when impossible
        candidates = [micro_batch]
    elif not divisible:
        grad_accumulation(gbatch, 1, gpus)
        candidates = []
    else:
        candidates = divisible

    def mem_tokens(tokens, ck):
        act = activation_bytes(config, tokens, ck, profile)["peak"]
        return memory_per_gpu(weights, trainable, gpus, act, bucket, overlap, offload, largest, zero_stage)

    def mem(mb, ck):
        return mem_tokens(mb * seq, ck)

    budget = HEADROOM * mem_gib * GIB
    chosen = {}
    for ck in (False, True):
        fits = [m for m in candidates if sum(mem(m, ck).values()) <= budget]
        chosen[ck] = (max(fits) if fits else None) if micro_batch is None else micro_batch
    shown_mb = micro_batch or chosen[True] or chosen[False] or 1

    memory = {}
    for ck in (False, True):
        mb = micro_batch or chosen[ck] or 1
        parts = mem(mb, ck)
        memory["with_checkpointing" if ck else "without_checkpointing"] = {
            "micro_batch": mb, "fits": sum(parts.values()) <= budget,
            "grad_accumulation": gbatch // (mb * gpus) if gbatch % (mb * gpus) == 0 else None,
            "gib": {k: v / GIB for k, v in parts.items()}, "total_gib": sum(parts.values()) / GIB,
            "communication": communication_per_step(
                trainable, gpus, gbatch // (mb * gpus) if gbatch % (mb * gpus) == 0 else None)}

    return {
        "model": model, "stage": stage, "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "layers": config.num_hidden_layers, "seq_len": seq, "global_batch": gbatch,
        "trainable_params": trainable, "total_params": total, "trainable_pct": 100.0 * trainable / total,
        "trainable_groups": groups,
        "weight_elements": weights,
        "gpu": gpu_key, "gpus": gpus, "gpu_memory_gib": mem_gib, "precision": "bf16" if has_bf16 else "fp16",
        "peak_flops": peak, "mfu": mfu, "reserve": reserve, "tokens": tokens,
        "steps": math.ceil(tokens / (gbatch * seq)),
        "model_flops_per_token": model_fpt,
        "executed_flops_per_token": {"without_checkpointing": exec_fpt[False], "with_checkpointing": exec_fpt[True]},
        "total_model_flops": tokens * model_fpt,
        "tokens_per_s_per_gpu": mfu * peak / model_fpt,
        "gpu_hours": gpu_hours, "gpu_hours_with_reserve": budget_hours,
        "days": budget_hours / gpus / 24, "days_without_reserve": gpu_hours / gpus / 24,
        "micro_batch": shown_mb, "memory": memory,
        "ds_buckets": {"elements": bucket, "overlap_factor": overlap},
        "ds_config": ds_name, "zero_stage": zero_stage,

        "optimizer_offload": offload, "host_optimizer_gib": 16 * trainable / gpus / GIB if offload else 0.0,
        "seconds_per_sequence": seq * model_fpt / (mfu * peak), "seconds_per_step": gbatch * seq * model_fpt / (mfu * peak * gpus),
        "long_context": long_context(seq, lambda tokens: sum(mem_tokens(tokens, True).values()), budget),
    }


ATTENTION = ("SDPA (torch scaled_dot_product_attention, as zhllama train loads models): FlashAttention-2 for "
             "bf16 causal attention on A100/H100, memory linear in the sequence")


def long_context(seq: int, total_bytes, budget: float) -> dict:
    """What one GPU can hold of one sequence, with gradient checkpointing and a micro batch of one: the
    longest sequence that fits (a multiple of 1,024 tokens, by bisection on the memory model), and whether
    `seq` needs sequence parallelism. ZeRO shards optimizer state, gradients (and with stage 3 weights)
    across GPUs, never one sequence's activations: past that length a sequence must be split across GPUs
    (DeepSpeed-Ulysses, ring attention) or its activations offloaded."""
    lo, hi = 0, 1 << 22                  # tokens: 0 fits by convention, 4M does not on any GPU listed
    while hi - lo > 1024:
        mid = (lo + hi) // 2 // 1024 * 1024
        lo, hi = (mid, hi) if total_bytes(mid) <= budget else (lo, mid)
    return {"attention": ATTENTION, "longest_sequence_one_gpu": lo, "needs_sequence_parallelism": seq > lo}


def memory_estimate(cfg, preset, gpus: int, ds_path) -> dict:
    """GiB per GPU the planner expects for a training run's own settings (model, stage with its
    overrides, micro batch, block size, DeepSpeed config), without and with gradient checkpointing:
    {False: GiB, True: GiB}. What `gradient_checkpointing: auto` decides from."""
    p = plan(model=cfg.model, stage=cfg.stage, tokens=1.0, gpus=gpus, micro_batch=cfg.micro_batch,
             seq_len=preset.block_size, global_batch=preset.global_batch, ds_config=str(ds_path), preset=preset,
             new_rows_from=_new_rows_from(cfg) if cfg.new_rows_only else None)
    return {ck: p["memory"]["with_checkpointing" if ck else "without_checkpointing"]["total_gib"] for ck in (False, True)}


def _new_rows_from(cfg):
    """Stage 1 with new_rows_only: where `zhllama vocab resize` says the added rows start."""
    return read_config_json(Path(cfg.model) / "config.json").get(BASE_VOCAB_KEY)


def _fmt_params(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def format_plan(p) -> str:
    lines = [
        f"model {p['model']} (d={p['hidden_size']}, layers={p['layers']}, vocab={p['vocab_size']:,}), "
        f"stage {p['stage']}, {p['tokens']:.3g} tokens of {p['seq_len']}, global batch {p['global_batch']}",
        f"  trainable      {p['trainable_params']:,} of {p['total_params']:,} = {p['trainable_pct']:.2f}%"
        + (f" ({describe_groups(p['trainable_groups'])})" if p["stage"] != "full" else ""),
        f"  GPUs           {p['gpus']} x {p['gpu']} ({p['gpu_memory_gib']:g} GiB, {p['precision']}, "
        f"peak {p['peak_flops'] / 1e12:g} TFLOP/s)",
        f"  FLOPs/token    {p['model_flops_per_token'] / 1e9:.2f} GFLOP model (4N + 2T + 12·L·d·s); executed "
        f"{p['executed_flops_per_token']['without_checkpointing'] / 1e9:.2f} "
        f"({p['executed_flops_per_token']['with_checkpointing'] / 1e9:.2f} with checkpointing)",
        f"  compute        {p['total_model_flops']:.3g} FLOPs, {p['steps']:,} steps, "
        f"{p['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU at MFU {p['mfu']:.0%}",
        f"  GPU-hours      {p['gpu_hours']:,.0f} ({p['days_without_reserve']:.1f} days); with "
        f"{p['reserve']:.0%} reserve {p['gpu_hours_with_reserve']:,.0f} GPU-hours = {p['days']:.1f} days",
        f"  memory per GPU (ZeRO-{p['zero_stage']}, ds_config {p['ds_config']}, GiB):",
        f"    {'':<30}{'weights':>8}{'grads':>7}{'buckets':>8}{'optim':>7}{'activ':>7}{'other':>7}{'total':>8}",
    ]
    for key, label in (("without_checkpointing", "no checkpointing"), ("with_checkpointing", "checkpointing")):
        m = p["memory"][key]
        g = m["gib"]
        verdict = "fits" if m["fits"] else f"DOES NOT FIT in {0.9 * p['gpu_memory_gib']:.0f}"
        accum = f", accum {m['grad_accumulation']}" if m["grad_accumulation"] else ""
        label = f"{label} (micro {m['micro_batch']})"
        lines.append(
            f"    {label:<30}{g['weights']:>8.1f}{g['gradients']:>7.1f}"
            f"{g['buckets']:>8.1f}{g['optimizer']:>7.1f}{g['activations']:>7.1f}{g['overhead'] + g['grad_transient']:>7.1f}"
            f"{m['total_gib']:>8.1f}  {verdict}{accum}")
    lc = p["long_context"]
    if not any(m["fits"] for m in p["memory"].values()) and not lc["needs_sequence_parallelism"]:
        lines.append("  no micro batch fits: use ds_configs/zero2_offload.json, more GPUs, or a shorter sequence")
    lines += [f"  time           {p['seconds_per_sequence']:,.1f} s per sequence of {p['seq_len']:,} tokens per GPU, "
              f"{p['seconds_per_step']:,.1f} s per step of {p['global_batch']} sequences on {p['gpus']} GPUs",
              f"  attention      {lc['attention']}",
              f"  one sequence   up to {lc['longest_sequence_one_gpu']:,} tokens fit one GPU (checkpointing, micro 1)"
              + (f": {p['seq_len']:,} needs sequence parallelism (DeepSpeed-Ulysses or ring attention across GPUs) "
                 "or activation offload; ZeRO-2 shards optimizer state and gradients, not a sequence"
                 if lc["needs_sequence_parallelism"] else "")]
    lines.append("  communication per GPU per step (bf16 gradients; ZeRO-2 reduces them after every micro batch, "
                 "ZeRO-1 once a step):")
    for key, label in (("without_checkpointing", "no checkpointing"), ("with_checkpointing", "checkpointing")):
        c = p["memory"][key]["communication"]
        label = f"{label} (micro {p['memory'][key]['micro_batch']}, accum {c['grad_accumulation']})"
        lines.append(f"    {label:<38}ZeRO-2 {c['zero2_bytes'] / 1e9:.2f} GB, ZeRO-1 {c['zero1_bytes'] / 1e9:.2f} GB; "
                     f"ZeRO-1 holds {c['zero1_extra_memory_bytes'] / GIB:.2f} GiB more per GPU")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- CLI

def add_arguments(parser):
    parser.add_argument("--model", default="llama-7b",
                        help="llama-7b, llama-13b, llama-33b, llama-65b, tiny, or an HF config.json (file or dir)")
    parser.add_argument("--vocab-size", type=int_range(1, DIMENSIONS["vocab_size"]), default=None,
                        help="vocabulary after the merge, e.g. 49953 (default: the model's)")
    parser.add_argument("--stage", default="stage2", choices=PLAN_STAGES,
                        help="what is trained (presets of pretrain/presets.py; full: every parameter)")
    parser.add_argument("--new-rows-from", type=int_range(0, DIMENSIONS["vocab_size"]), default=None,
                        help="stage1 only: train only embedding rows >= this id (the base vocab size, e.g. 32000)")
    parser.add_argument("--embed-lr-base", type=float_range(0, RANGES["embed_lr_base"][1]), default=1.0,
                        help="the base's own vocabulary rows' lr as a multiple of the stage lr, as in the run config; "
                             "0 freezes them (no gradient, no optimizer state), needs --vocab-size above the "
                             "model's own (default 1)")
    parser.add_argument("--tokens", type=float_range(0, 1e16, above_low=True),
                        required=True, help="tokens to train on, e.g. 20e9")
    parser.add_argument("--gpus", type=int_range(1, 1 << 20),
                        required=True, help="number of GPUs (data-parallel world size)")
    parser.add_argument("--gpu", default="a100-80g", help=f"GPU type: {', '.join(GPUS)}")
    parser.add_argument("--mfu", type=float_range(0, 1, above_low=True), default=DEFAULT_MFU,
                        help=f"model FLOPs utilisation (6N + attention convention, as in metrics.jsonl); "
                             f"default {DEFAULT_MFU}")
    parser.add_argument("--reserve", type=float_range(0, 10), default=DEFAULT_RESERVE,
                        help=f"extra fraction of compute for failures, restarts and evaluation; default "
                             f"{DEFAULT_RESERVE} (BloombergGPT's)")
    parser.add_argument("--micro-batch", type=int_range(1, RANGES["micro_batch"][1]), default=None,
                        help="sequences per GPU per forward (default: the largest that fits and divides the "
                             "global batch)")
    parser.add_argument("--seq-len", "--block-size", dest="seq_len", type=int_range(2, RANGES["block_size"][1]),
                        default=None, help="tokens per sequence, the run's block_size (default: the stage's, 512); "
                                           "e.g. 16384 for a long-context stage")
    parser.add_argument("--global-batch", type=int_range(1, RANGES["global_batch"][1]), default=None,
                        help="sequences per optimizer step (default: the stage's)")
    parser.add_argument("--ds-config", default=None,
                        help="DeepSpeed config for the ZeRO stage, bucket sizes and optimizer offload: a JSON path or "
                             "a name in ds_configs/ (zero1, zero2, zero2_offload; default: the stage's, as "
                             "`zhllama train` uses: zero2 for every stage)")
    parser.add_argument("--layers", type=int_range(1, DIMENSIONS["num_hidden_layers"]), default=None,
                        help="override the number of decoder layers (e.g. 2, to compare with bench/loss_memory.py)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args):
    p = plan(model=args.model, vocab_size=args.vocab_size, stage=args.stage, tokens=args.tokens, gpus=args.gpus,
             gpu=args.gpu, mfu=args.mfu, reserve=args.reserve, micro_batch=args.micro_batch, seq_len=args.seq_len,
             global_batch=args.global_batch, new_rows_from=args.new_rows_from, ds_config=args.ds_config,
             layers=args.layers, embed_lr_base=args.embed_lr_base)
    print(json.dumps(p, indent=2) if args.json else format_plan(p))
    return 0
