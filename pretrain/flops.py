"""FLOPs per token and peak FLOP/s, for MFU.

Model FLOPs per trained token (PaLM appendix B): 6 * N for the matmuls of forward and backward over
the N non-embedding-lookup parameters (lm_head included), plus 12 * n_layers * d_model * seq for
attention scores and values. MFU counts these model FLOPs whatever is frozen, so it compares runs
and stages on one scale.
"""

import time

import torch

# Dense bf16/fp16 tensor-core peaks from the vendors' datasheets (FLOP/s, no sparsity).
GPU_PEAK_FLOPS = {
    "a100": 312e12, "a800": 312e12, "h100": 989e12, "h800": 989e12, "h200": 989e12,
    "h20": 148e12, "l40s": 362e12, "a10": 125e12, "v100": 125e12, "4090": 165e12, "3090": 71e12,
}


def matmul_params(config) -> int:
    """Parameters that take part in matmuls: everything except the embedding lookup."""
    d, layers = config.hidden_size, config.num_hidden_layers
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    attn = d * d * 2 + 2 * d * kv * head_dim  # q, o and k, v
    mlp = 3 * d * config.intermediate_size
    return layers * (attn + mlp) + d * config.vocab_size  # + lm_head


def flops_per_token(config, seq_len: int) -> float:
    return 6.0 * matmul_params(config) + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


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


def peak_flops(device: torch.device) -> float:
    """Datasheet peak on GPUs, measured matmul peak on CPU."""
    if device.type == "cuda":
        peak = gpu_peak_flops(torch.cuda.get_device_name(device))
        if peak:
            return peak
    return measured_cpu_peak_flops()
