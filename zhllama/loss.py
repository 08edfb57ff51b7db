"""The one token loss of every stage: summed next-token cross-entropy, computed chunk by chunk.

The full-vocabulary logits are the largest activation of a LLaMA step with an extended vocabulary:
for each token the bf16 logits (2V bytes), their fp32 copy (4V), the log-softmax (4V) and, in the
backward, its gradient in fp32 and bf16 (6V). `token_loss_sum` never holds them for more than
`chunk_tokens` positions at once: with several chunks each chunk's `lm_head` + cross-entropy runs
under `torch.utils.checkpoint`, so nothing of size V is kept between the forward and the backward,
and the backward recomputes one chunk at a time. With a single chunk there is nothing to gain and no
recompute is done.

`lm_head` is called as a module, not through its weight: in stage 2 and SFT it is a PEFT
`ModulesToSaveWrapper` whose trained copy must receive the gradient.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_BYTES = 64 * 2 ** 20  # fp32 logits per chunk: 64 MiB is ~336 tokens at a 49,953-token vocabulary


def chunk_tokens(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Positions per chunk so that one chunk's fp32 logits take about `chunk_bytes`."""
    return max(1, chunk_bytes // (4 * vocab_size))


def _chunk_loss(lm_head, hidden, labels):
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def token_loss_sum(lm_head, hidden, labels, vocab_size: int, chunk: int = None):
    """Sum over positions t of -log p(labels[:, t+1] | hidden[:, t]), skipping labels == -100.

    hidden: (batch, seq, d) final hidden states; labels: (batch, seq) token ids aligned with the input
    (the shift is done here). Returns a 0-dim fp32 tensor on hidden's device; no host sync.
    """
    d = hidden.size(-1)
    h = hidden[:, :-1].reshape(-1, d)
    y = labels[:, 1:].reshape(-1)
    step = chunk or chunk_tokens(vocab_size)
    if h.size(0) <= step or not torch.is_grad_enabled():
        return _chunk_loss(lm_head, h, y) if h.size(0) <= step else sum(
            _chunk_loss(lm_head, h[s:s + step], y[s:s + step]) for s in range(0, h.size(0), step))
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, h.size(0), step):
        total = total + checkpoint(_chunk_loss, lm_head, h[s:s + step], y[s:s + step], use_reentrant=False)
    return total


class CausalLMTokenLoss(torch.nn.Module):
    """A causal LM whose forward returns the summed token loss (the module DeepSpeed wraps).

    The decoder runs with `use_cache=False`, always: with a KV cache transformers does not derive the
    per-example attention of packed SFT sequences from their `position_ids`, and examples would attend
    across their boundaries. The loss goes through `token_loss_sum`, so the full logits never exist.
    `model` (a transformers causal LM, possibly inside PEFT) stays reachable as `.model`.
    """

    def __init__(self, model, chunk: int = None):
        super().__init__()
        self.model = model
        self.chunk = chunk

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None):
        """The decoder's final (normalised) hidden states, without a KV cache."""
        return self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=position_ids, use_cache=False).last_hidden_state

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        hidden = self.hidden_states(input_ids, attention_mask, position_ids)
        lm_head = self.model.get_output_embeddings()
        return token_loss_sum(lm_head, hidden, labels, self.model.config.vocab_size, self.chunk)
