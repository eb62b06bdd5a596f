"""Reading queries, keys and values out of the encoder's (fused-attention) timm blocks with forward hooks."""
from contextlib import contextmanager

import torch


@contextmanager
def capture_qkv(encoder, blocks):
    """Inside the context, `store[i]` holds the qkv projection output [B, P + N, 3 * D] of encoder block i
    after each forward (detached): our ViT's fused `qkv` linear, or the concatenated q, k, v projections of
    Primus' EVA blocks (same q | k | v layout). The q/k norms and (Primus) the rotary embedding are applied in
    `attention_probs`, so softmax(q k^T * scale) there is the attention the fused kernel computes."""
    store, parts = {}, {}

    def keep(i, name):
        def hook(module, inputs, output):
            parts.setdefault(i, {})[name] = output.detach()
            if name in ("qkv", "v"):  # v is projected last
                p = parts.pop(i)
                store[i] = p["qkv"] if name == "qkv" else torch.cat([p["q"], p["k"], p["v"]], dim=-1)
        return hook

    handles = []
    for i in blocks:
        attn = encoder.blocks[i].attn
        if getattr(attn, "qkv", None) is not None:
            handles.append(attn.qkv.register_forward_hook(keep(i, "qkv")))
        else:
            handles += [getattr(attn, f"{n}_proj").register_forward_hook(keep(i, n)) for n in ("q", "k", "v")]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def encoder_rope(encoder):
    """The rotary embedding [N, channels] of a Primus encoder's token grid; None for our ViT."""
    eva = getattr(encoder, "eva", None)
    return eva.rope.get_embed() if eva is not None and eva.rope is not None else None


def split_heads(qkv: torch.Tensor, num_heads: int):
    """[B, N, 3 * D] -> q, k, v, each [B, heads, N, D / heads] (timm's layout: q | k | v, heads inside each)."""
    B, N, three_d = qkv.shape
    return qkv.reshape(B, N, 3, num_heads, three_d // 3 // num_heads).permute(2, 0, 3, 1, 4).unbind(0)


def attention_probs(qkv: torch.Tensor, attn, rope: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) [B, heads, N, N] of a timm attention module `attn` from its qkv output; `rope`
    (Primus, all tokens, no prefix) is applied to q and k as the EVA block does."""
    q, k, _ = split_heads(qkv.float(), attn.num_heads)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        from timm.layers import apply_rot_embed_cat
        half = getattr(attn, "rotate_half", False)
        q, k = apply_rot_embed_cat(q, rope.float(), half=half), apply_rot_embed_cat(k, rope.float(), half=half)
    return (q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1)


def values(qkv: torch.Tensor) -> torch.Tensor:
    """The attention values V [B, N, D] (all heads side by side) from a qkv output [B, N, 3 * D]."""
    return qkv[..., 2 * qkv.shape[-1] // 3:]
