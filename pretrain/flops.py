"""Model FLOPs per trained token and the peak FLOP/s, for MFU.

Model FLOPs per token (PaLM appendix B, with frozen weights counted as what they cost): the forward
pass, 2 per matmul parameter (N: everything but the embedding lookup, lm_head and LoRA included); the
backward pass to the activations, another 2N, because every stage trains something at the bottom of
the network (embed_tokens, LoRA in layer 0) so the gradient flows through every layer; and the weight
gradients, 2 per *trained* matmul parameter T. Attention scores and values add 12 * n_layers * d_model
* seq (4 forward, 8 backward). Full training (T = N) gives the usual 6N + 12 L d s; a frozen layer
costs 4 per parameter, not 6. Recomputation under gradient checkpointing is not model work and is not
counted (`zhllama plan` shows it separately as executed FLOPs).

The peak: the datasheet figure of a known GPU; none for a GPU not in the table (MFU is then unknown,
never a guess); on CPU, this machine's measured fp32 matmul rate. A measurement taken under load can
come out below what training later achieves, so it is treated as a lower bound and raised to the best
rate achieved (`MFUMeter`): MFU on CPU never reads above 100%, and it is labelled as measured.
"""

import time
from typing import Optional, Tuple

import torch

# Dense bf16/fp16 tensor-core peaks from the vendors' datasheets (FLOP/s, no sparsity).
GPU_PEAK_FLOPS = {
    "a100": 312e12, "a800": 312e12, "h100": 989e12, "h800": 989e12, "h200": 989e12,
    "h20": 148e12, "l40s": 362e12, "a10": 125e12, "v100": 125e12, "4090": 165e12, "3090": 71e12,
}


def matmul_params(config) -> int:
    """Parameters of the base model that take part in matmuls: everything except the embedding lookup."""
    d, layers = config.hidden_size, config.num_hidden_layers
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    attn = d * d * 2 + 2 * d * kv * head_dim  # q, o and k, v
    mlp = 3 * d * config.intermediate_size
    return layers * (attn + mlp) + d * config.vocab_size  # + lm_head


def flops_per_token(config, seq_len: int, trainable_matmul: Optional[int] = None, adapter_matmul: int = 0) -> float:
    """Model FLOPs per trained token: 4 (N + A) + 2 T + 12 L d s (module docstring).

    N = `matmul_params(config)`; A = adapter (LoRA) parameters, matmuls the base config does not have;
    T = trained matmul parameters (LoRA, lm_head, whole layers; not the embedding lookup), None: all
    of N + A (full training: 6N + 12 L d s)."""
    n = matmul_params(config) + adapter_matmul
    trained = n if trainable_matmul is None else trainable_matmul
    return 4.0 * n + 2.0 * trained + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


def trainable_matmul_params(model) -> int:
    """Trainable parameters that take part in matmuls (LoRA, lm_head; not the input embeddings)."""
    emb = model.get_input_embeddings()
    emb_ids = {id(p) for p in emb.parameters()}
    return sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in emb_ids)


def adapter_matmul_params(model) -> int:
    """Parameters of LoRA layers (lora_A, lora_B): matmuls added to the base model's."""
    return sum(p.numel() for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name)


def gpu_peak_flops(device_name: str):
    name = device_name.lower()
    for key, peak in sorted(GPU_PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return peak
    return None


def measured_cpu_peak_flops(size: int = 1024, seconds: float = 0.5) -> float:
    """This CPU's fp32 matmul FLOP/s with the current thread count: the best of a short burst."""
    g = torch.Generator().manual_seed(0)  # its own generator: never disturb the training RNG streams
    a = torch.randn(size, size, generator=g)
    b = torch.randn(size, size, generator=g)
    torch.mm(a, b)  # warm up
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2.0 * size ** 3 / (time.perf_counter() - t))
    return best


def peak_flops(device: torch.device) -> Tuple[Optional[float], str]:
    """(peak FLOP/s of one device or None, where it comes from): datasheet, unknown GPU, measured CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        return (peak, f"datasheet peak of {name}") if peak else (None, f"unknown GPU {name}: no peak, no MFU")
    return measured_cpu_peak_flops(), "measured CPU matmul peak (a lower bound, raised to the best rate achieved)"


class MFUMeter:
    """MFU of a step from its tokens and seconds: model FLOPs per token x tokens / seconds / peak x world.

    With no peak (an unknown GPU) MFU is None. With a measured CPU peak, the peak is raised to any
    higher rate a step achieves: the measurement is a lower bound of what the matmuls can do."""

    def __init__(self, flops_per_token: float, device_peak: Optional[float], world: int, measured: bool):
        self.flops_per_token = flops_per_token
        self.peak = device_peak * world if device_peak else None
        self.measured = measured

    def __call__(self, tokens: float, seconds: float) -> Optional[float]:
        if self.peak is None or seconds <= 0:
            return None
        achieved = self.flops_per_token * tokens / seconds
        if self.measured and achieved > self.peak:
            self.peak = achieved
        return achieved / self.peak
