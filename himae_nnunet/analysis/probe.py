"""Reading queries, keys and values out of the encoder's (fused-attention) timm blocks with forward hooks."""
from contextlib import contextmanager

import torch


@contextmanager
def capture_qkv(encoder, blocks):
    """Inside the context, `store[i]` holds the qkv projection output [B, 1 + N, 3 * D] of encoder block i
    after each forward (detached); timm's blocks apply no q/k norm here, so softmax(q k^T * scale) is the
    attention the fused kernel computes."""
    store = {}
    handles = [encoder.blocks[i].attn.qkv.register_forward_hook(
        lambda module, inputs, output, i=i: store.__setitem__(i, output.detach())) for i in blocks]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def split_heads(qkv: torch.Tensor, num_heads: int):
    """[B, N, 3 * D] -> q, k, v, each [B, heads, N, D / heads] (timm's layout: q | k | v, heads inside each)."""
    B, N, three_d = qkv.shape
    return qkv.reshape(B, N, 3, num_heads, three_d // 3 // num_heads).permute(2, 0, 3, 1, 4).unbind(0)


def attention_probs(qkv: torch.Tensor, attn) -> torch.Tensor:
    """softmax(q k^T * scale) [B, heads, N, N] of timm Attention module `attn` from its qkv output."""
    q, k, _ = split_heads(qkv.float(), attn.num_heads)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return (q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)


def values(qkv: torch.Tensor) -> torch.Tensor:
    """The attention values V [B, N, D] (all heads side by side) from a qkv output [B, N, 3 * D]."""
    return qkv[..., 2 * qkv.shape[-1] // 3:]
