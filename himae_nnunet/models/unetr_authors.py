"""The authors' downstream UNETR state dict (MONAI key names) as a state dict of our `UNETR(decoder="authors")`.

Their network (`downstream/models/UNETR/unetr.py` of the paper's repository, built on MONAI's ViT and UNETR
blocks) and ours compute the same function with these names (theirs -> ours):

    vit.patch_embedding.patch_embeddings.1.weight [D, p^3 C]  -> encoder.patch_embed.proj.weight [D, C, p, p, p]
        (MONAI's perceptron embedding orders a patch's values (p1, p2, p3, c))
    vit.patch_embedding.patch_embeddings.1.bias               -> encoder.patch_embed.proj.bias
    vit.patch_embedding.position_embeddings                   -> encoder.pos_embed (learnable, no cls slot)
    vit.blocks.i.{norm1,norm2,attn.qkv}                       -> encoder.blocks.i.{same}
    vit.blocks.i.attn.out_proj / mlp.linear1 / mlp.linear2    -> encoder.blocks.i.attn.proj / mlp.fc1 / mlp.fc2
    vit.norm                                                  -> encoder.norm
    encoder1 (input skip)                                     -> decoder.skip_input
    encoder2 / encoder3 / encoder4 (taps 3 / 6 / 9)           -> decoder.skip_tap0 / skip_tap1 / skip_tap2
        .transp_conv_init -> .first;  .blocks.j.0 -> .stages.j.0;  .blocks.j.1 -> .stages.j.1
    decoder5 / decoder4 / decoder3 / decoder2                 -> decoder.up4 / up3 / up2 / up1
        .transp_conv -> .up;  decoder2.conv3d (3x3 after the resize) -> up1.up;  .conv_block -> .block
    out.conv.conv                                             -> decoder.seg_layers
    inside residual blocks: convN.conv -> convN (N = 1, 2);  conv3.conv (1x1 residual) -> skip.0

Their instance norms have no affine parameters, hence no keys. Their ViT's LayerNorm eps is torch's 1e-5:
build the target with `norm_eps=1e-5` (as `himae-nnunet plan --unetr authors` does).
"""
import re

import torch

from himae_nnunet.core.errors import UserError

ENCODER_RENAMES = (  # (their key pattern, our key), for `vit.*`
    (r"vit\.patch_embedding\.patch_embeddings\.1\.(weight|bias)", r"encoder.patch_embed.proj.\1"),
    (r"vit\.patch_embedding\.position_embeddings", r"encoder.pos_embed"),
    (r"vit\.blocks\.(\d+)\.attn\.out_proj\.(weight|bias)", r"encoder.blocks.\1.attn.proj.\2"),
    (r"vit\.blocks\.(\d+)\.mlp\.linear([12])\.(weight|bias)", r"encoder.blocks.\1.mlp.fc\2.\3"),
    (r"vit\.blocks\.(\d+)\.(norm1|norm2|attn\.qkv)\.(weight|bias)", r"encoder.blocks.\1.\2.\3"),
    (r"vit\.norm\.(weight|bias)", r"encoder.norm.\1"),
)
DECODER_MODULES = {"encoder1": "skip_input", "encoder2": "skip_tap0", "encoder3": "skip_tap1", "encoder4": "skip_tap2",
                   "decoder5": "up4", "decoder4": "up3", "decoder3": "up2", "decoder2": "up1", "out": "seg_layers"}
DECODER_RENAMES = (  # (their key tail pattern, ours), inside one of DECODER_MODULES
    (r"layer\.conv([12])\.conv\.weight", r"conv\1.weight"),  # residual block of the input skip
    (r"layer\.conv3\.conv\.weight", r"skip.0.weight"),
    (r"transp_conv_init\.conv\.weight", r"first.weight"),
    (r"blocks\.(\d+)\.0\.conv\.weight", r"stages.\1.0.weight"),
    (r"blocks\.(\d+)\.1\.conv([12])\.conv\.weight", r"stages.\1.1.conv\2.weight"),
    (r"transp_conv\.conv\.weight", r"up.weight"),
    (r"conv3d\.(weight|bias)", r"up.\1"),  # decoder2: the 3x3 conv after the trilinear resize
    (r"conv_block\.conv([12])\.conv\.weight", r"block.conv\1.weight"),
    (r"conv_block\.conv3\.conv\.weight", r"block.skip.0.weight"),
    (r"conv\.conv\.(weight|bias)", r"\1"),  # out: the 1x1 classifier
)


def _rename(key: str, rules) -> str | None:
    for pattern, target in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, target, key)
    return None


def authors_key_to_ours(key: str) -> str | None:
    """Our name for one key of the authors' UNETR state dict; None when it is not one of theirs."""
    if key.startswith("vit."):
        return _rename(key, ENCODER_RENAMES)
    module, _, tail = key.partition(".")
    tail_ours = _rename(tail, DECODER_RENAMES) if module in DECODER_MODULES else None
    return None if tail_ours is None else f"decoder.{DECODER_MODULES[module]}.{tail_ours}"


def convert_authors_unetr_state_dict(state_dict: dict, in_chans: int = 1) -> dict:
    """Their full UNETR state dict -> ours (for `UNETR(decoder="authors", keep_cls_token=False, ...)`).

    Refuses, naming it, any key that is not part of their UNETR."""
    out = {}
    for key, value in state_dict.items():
        ours = authors_key_to_ours(key.removeprefix("module."))
        if ours is None:
            raise UserError(f"{key} is not a key of the authors' UNETR (downstream/models/UNETR/unetr.py); give "
                            f"the state dict of that network as their code saves it")
        if ours == "encoder.patch_embed.proj.weight":
            value = perceptron_to_conv(value, in_chans)
        out[ours] = value
    return out


def perceptron_to_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """MONAI's patch linear [D, p^3 C] over values ordered (p1, p2, p3, c) -> Conv3d weight [D, C, p, p, p]."""
    dim, n = weight.shape
    p = round((n // in_chans) ** (1 / 3))
    if p ** 3 * in_chans != n:
        raise UserError(f"patch-embedding weight {tuple(weight.shape)} is not [D, p^3 * {in_chans}]; give the "
                        f"input channel count the network was built with")
    return weight.reshape(dim, p, p, p, in_chans).permute(0, 4, 1, 2, 3).contiguous()
