"""Shared pieces of the MIM scripts: ViT encoder, masking, data, distributed, checkpoints, analysis tools.

Every script (mae_mff.py, pixmim_mff.py, pilamim.py, probe.py, finetune.py, analyze.py) imports from
here; nothing in this file knows about a particular method, and none of it fixes the order of a
script's set-up: each script's main() calls these pieces in its own visible order. A method file
copied together with this file alone runs (pixmim_mff.py also needs mae_mff.py, whose model it extends).
Section order: encoder -> masking -> data -> distributed -> optimisation -> checkpoints -> logging ->
command line -> analysis.

The contract every pre-training model meets (analyze.py relies on it, nothing else):
    model(imgs, mask_ratio, noise=None) -> (loss, pred, mask, ...)  loss: the training loss (scalar);
        pred (N, L, p*p*C): pixel predictions of the target patches (standardised under norm_pix_loss);
        mask (N, L), 1 = removed; a model may return more after these three (PiLaMIM: its loss terms)
    model.reconstruction_target(imgs) -> (N, C, H, W): the image pred reconstructs (imgs, or a filtered one)
    model.norm_pix_loss, model.patch_size, model.num_patches
and every pre-training script offers get_args_parser(), resolve_recipe(args) (fills in what is resolved
at start-up; a no-op on resolved args) and build_model(args), and records its own file name as the
checkpoint's 'script' (save_training_state), from which analyze.py rebuilds the model and its loss.
"""
import argparse
import errno
import io
import json
import math
import os
import random
import re
import sys
from contextlib import contextmanager, nullcontext
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from timm.models.vision_transformer import Block, PatchEmbed
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data._utils.worker import _generate_state  # how DataLoader seeds a worker's numpy
from torchvision import datasets, transforms
from torchvision.io import ImageReadMode, decode_jpeg
from tqdm import tqdm


class InputError(ValueError):
    """Bad user input. The scripts print it as one line (problem and fix), without a traceback."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; raised before anything is saved, so the last checkpoint stays good."""


class DiskFullError(RuntimeError):
    """A checkpoint write ran out of space; the previous checkpoint file is untouched."""


# ----------------------------------------------------------------------------------------------
# ViT encoder (MAE, He et al. 2022). Parameter names match the official MAE checkpoints and timm's
# VisionTransformer, so weights move between the three without renaming.

VIT_SIZES = {
    'tiny': dict(embed_dim=192, depth=12, num_heads=3),
    'small': dict(embed_dim=384, depth=12, num_heads=6),
    'base': dict(embed_dim=768, depth=12, num_heads=12),
    'large': dict(embed_dim=1024, depth=24, num_heads=16),
    'huge': dict(embed_dim=1280, depth=32, num_heads=16),
}
ENCODER_KEYS = ('patch_embed.', 'cls_token', 'pos_embed', 'blocks.', 'norm.')
LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def sincos_pos_embed_2d(dim, grid_size, cls_token=True):
    """Fixed 2-D sin-cos table, (1 [+1 cls row of zeros] + grid_size**2, dim), float32.

    First half of the channels encodes the column (x), second half the row (y); per axis
    omega_k = 1 / 10000^(k / (dim/4)) and the output is [sin, cos]. Computed in float64 like the
    official numpy helper, so the values are identical.
    """
    if dim % 4:
        raise InputError(f'embedding width {dim} is not divisible by 4: the 2-D sin-cos position '
                         'embedding needs a multiple of 4')
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing='ij')           # (g, g) each, row-major

    def embed_1d(pos):                                                   # (g*g,) -> (g*g, dim/2)
        angles = pos.flatten()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([embed_1d(cols), embed_1d(rows)], dim=1)          # (g*g, dim)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), table])
    return table.float()


def patchify(imgs, p):
    """(N, C, h*p, w*p) -> (N, h*w, p*p*C), channels last inside a patch (the official layout)."""
    n, c, H, W = imgs.shape
    if H % p or W % p:
        raise InputError(f'image size {H}x{W} is not divisible by patch size {p}: '
                         'pick --input_size as a multiple of the patch size (the patch<p> of --model)')
    h, w = H // p, W // p
    x = imgs.reshape(n, c, h, p, w, p)
    return torch.einsum('nchpwq->nhwpqc', x).reshape(n, h * w, p * p * c)


def unpatchify(x, p, h=None, w=None, channels=3):
    """(N, h*w, p*p*C) -> (N, C, h*p, w*p); exact inverse of patchify (square grid by default)."""
    n, L, _ = x.shape
    if h is None:
        h = w = int(round(L ** 0.5))
    x = x.reshape(n, h, w, p, p, channels)
    return torch.einsum('nhwpqc->nchpwq', x).reshape(n, channels, h * p, w * p)


def random_masking(n, L, mask_ratio, device, noise=None):
    """Per-sample random masking by sorting uniform noise (the same masks as official MAE for a given seed).

    Returns ids_keep (N, K) with K = int(L * (1 - mask_ratio)), mask (N, L) with 1 = removed,
    0 = kept, in the original patch order, and ids_restore (N, L) that undoes the shuffle.
    """
    len_keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(n, L, device=device)                          # one draw per call
    ids_shuffle = torch.argsort(noise, dim=1)                            # ascend: small is keep
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = torch.ones(n, L, device=device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, mask, ids_restore


def check_mask_ratio(mask_ratio, num_patches):
    """random_masking needs at least one visible and one masked patch per image (else 0/0 or no input)."""
    keep = int(num_patches * (1 - mask_ratio)) if math.isfinite(mask_ratio) else -1
    if not 1 <= keep <= num_patches - 1:
        top = math.floor((1 - 1 / num_patches) * 1e4) / 1e4                # round down: it must still work
        raise InputError(f'--mask_ratio {mask_ratio} leaves {max(keep, 0)} of {num_patches} patches visible: '
                         f'use a ratio above 0 and at most {top:g}, so that 1 to {num_patches - 1} stay visible')


def restore_order(x, mask_token, ids_restore):
    """Decoder input: visible tokens (N, 1 + K, D) plus mask tokens -> (N, 1 + L, D), cls first,
    patches back in their original order (ids_restore undoes the masking shuffle)."""
    n, L = ids_restore.shape
    x_ = torch.cat([x[:, 1:], mask_token.expand(n, L + 1 - x.shape[1], -1)], dim=1)  # shuffled order
    x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))     # original order
    return torch.cat([x[:, :1], x_], dim=1)


def pixel_targets(imgs, patch_size, norm_pix):
    """Reconstruction target (N, L, p*p*C); norm_pix standardises each patch (unbiased var, eps 1e-6)."""
    target = patchify(imgs, patch_size)
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6) ** .5
    return target


def masked_mse(pred, target, mask):
    """Per-patch MSE (N, L), averaged over the masked patches only (mask 1 = removed); fp32."""
    loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def init_weights(module):
    """MAE init: xavier-uniform Linear (zero bias), unit LayerNorm; pass to Module.apply."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ViTEncoder(nn.Module):
    """Pre-norm ViT with a [cls] token and a fixed sin-cos position embedding (timm key names)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24,
                 num_heads=16, mlp_ratio=4., drop_path_rate=0., qkv_bias=True, norm_eps=1e-6):
        super().__init__()
        if img_size % patch_size:
            raise InputError(f'image size {img_size} is not divisible by patch size {patch_size}: '
                             'pick --input_size as a multiple of the patch size (the patch<p> of --model)')
        self.patch_size, self.depth = patch_size, depth
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed, not learned; kept a (frozen) Parameter so official checkpoints load unchanged.
        grid = img_size // patch_size
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(embed_dim, grid)[None], requires_grad=False)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()          # stochastic depth (fine-tune)
        # eps 1e-6 as MAE; the weights of PiLaMIM's public code need its 1e-5 (read_architecture says which).
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        # timm's Block runs attention through F.scaled_dot_product_attention (flash / mem-efficient).
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i], norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.apply(init_weights)
        w = self.patch_embed.proj.weight.data                            # xavier on the (out, in*k*k) view
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=.02)

    def embed(self, imgs, ids_keep=None):
        """imgs (N, C, H, W) -> tokens (N, 1 + K, D): patches (+pos), kept ones only, cls in front."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]               # (N, L, D)
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))  # (N, K, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def forward_blocks(self, x, block_ids):
        """Run the trunk; return the raw residual stream after each block in block_ids (ascending)."""
        outs = []
        for i, blk in enumerate(self.blocks[:block_ids[-1] + 1]):
            x = blk(x)
            if i in block_ids:
                outs.append(x)
        return outs

    def forward_features(self, imgs, ids_keep=None):
        """Unmasked (or given-mask) features after the final norm: (N, 1 + K, D), cls at index 0."""
        return self.norm(self.forward_blocks(self.embed(imgs, ids_keep), [self.depth - 1])[-1])


def encoder_state_dict(state_dict, prefix=''):
    """The encoder part of a checkpoint (the keys timm's VisionTransformer has), prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items()
            if k.startswith(prefix) and k[len(prefix):].startswith(ENCODER_KEYS)}


def load_matching_state(module, state_dict, source, strict=True):
    """load_state_dict with a one-line error instead of a wall of mismatched keys."""
    own = module.state_dict()
    for k, v in state_dict.items():
        if k in own and own[k].shape != v.shape:
            raise InputError(f'{source} was made for another architecture ({k}: {tuple(v.shape)} there, '
                             f'{tuple(own[k].shape)} here): pass the --model/--depth/--input_size '
                             'it was trained with')
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if strict and (missing or unexpected):
        raise InputError(f'{source} does not match this model (missing {missing[:3]}, unexpected '
                         f'{unexpected[:3]}): pass the --model and MFF flags it was trained with')
    module.load_state_dict(state_dict, strict=False)
    return missing, unexpected


# Reading the encoder of any checkpoint (probe.py, finetune.py, analyze.py). Each format the weights
# were released in is recognised from its keys and converted to our own form (convert_checkpoint): our
# checkpoints ({'model', 'args', 'script', ...}), official MAE ({'model'}), bare timm ViT state dicts,
# `timm:NAME` hub models, OpenMMLab files (mmpretrain MAE / MFF, mmselfsup MAE / PixMIM) and PiLaMIM's
# public code. SPEC.md section 7 holds the facts of each format.

def size_of(model_name):
    """'mae_vit_tiny_patch4' -> ('tiny', 4); any script's '<x>_vit_<size>_patch<p>' name works, else (None, None).

    The one model registry of the project: a --model name states the ViT size (VIT_SIZES) and the patch.
    """
    m = re.search(r'vit_([a-z]+)_patch(\d+)', model_name or '')
    return (m.group(1), int(m.group(2))) if m and m.group(1) in VIT_SIZES else (None, None)


def vit_arch(model_name, depth=None):
    """--model (and --depth, fewer blocks at the same width for small studies) -> the encoder's
    dict(patch_size, embed_dim, depth, num_heads)."""
    size, patch = size_of(model_name)
    if size is None:
        raise InputError(f"--model '{model_name}' names no ViT size and patch: use <name>_vit_<size>_patch<p> with "
                         f"size {'/'.join(VIT_SIZES)}, e.g. mae_vit_base_patch16 or mae_vit_tiny_patch4")
    arch = dict(VIT_SIZES[size], patch_size=patch)
    if depth is not None:
        if depth < 1:
            raise InputError(f'--depth {depth} < 1: give at least one encoder block, or omit it for the standard depth')
        arch['depth'] = depth
    return arch


def size_of_width(dim):
    """Standard ViT size of an embedding width (192 -> 'tiny'), or None."""
    return next((s for s, v in VIT_SIZES.items() if v['embed_dim'] == dim), None)


def vit_name(state):
    """'ViT-B/16' for a standard encoder in timm names; width, depth and size spelled out otherwise."""
    dim, patch = state['cls_token'].shape[-1], state['patch_embed.proj.weight'].shape[-1]
    depth = 1 + max((int(k.split('.')[1]) for k in state if k.startswith('blocks.')), default=-1)
    img = math.isqrt(state['pos_embed'].shape[1] - 1) * patch
    size = size_of_width(dim)
    name = f'ViT-{size[0].upper()}/{patch}' if size else f'ViT D={dim}, patch {patch}'
    if size and depth != VIT_SIZES[size]['depth']:
        name += f', {depth} blocks'
    return name + ('' if img == 224 else f' at {img} px')


# OpenMMLab names -> ours (mae_mff.MaskedAutoencoder = timm names + mff.* + the MAE decoder). Each rule
# matches the START of a key; `backbone.layers.` must not match `backbone.proj_layers.` (MFF).
_OPENMMLAB_BLOCK = (('ln1.', 'norm1.'), ('ln2.', 'norm2.'), ('attn.qkv.', 'attn.qkv.'), ('attn.proj.', 'attn.proj.'),
                    ('ffn.layers.0.0.', 'mlp.fc1.'), ('ffn.layers.1.', 'mlp.fc2.'))
OPENMMLAB_NAMES = [
    (r'backbone\.patch_embed\.projection\.', 'patch_embed.proj.'),
    (r'backbone\.(cls_token|pos_embed)$', r'\1'),                       # pos_embed copied as stored
    *[(rf'backbone\.layers\.(\d+)\.{re.escape(a)}', rf'blocks.\1.{b}') for a, b in _OPENMMLAB_BLOCK],
    (r'backbone\.ln1\.', 'norm.'),                                       # pre-training: the final norm
    (r'backbone\.ln2\.', 'fc_norm.'),                                    # fine-tuned: the norm after pooling
    (r'backbone\.proj_layers\.(\d+)\.', r'mff.proj.\1.'),                # MFF: Linear per shallow level
    (r'backbone\.proj_weights$', 'mff.fusion_logits'),                   # MFF: (levels, 1, 1, 1) -> (levels,)
    (r'neck\.(decoder_embed\.|mask_token$|decoder_pos_embed$|decoder_pred\.)', r'\1'),
    *[(rf'neck\.decoder_blocks\.(\d+)\.{re.escape(a)}', rf'decoder_blocks.\1.{b}') for a, b in _OPENMMLAB_BLOCK],
    (r'neck\.ln1\.', 'decoder_norm.'),
    (r'head\.fc\.', 'head.'),                                            # fine-tuned classifier
]
OPENMMLAB_IGNORED = ('target_generator.', 'data_preprocessor.')         # PixMIM's filter is read, not loaded


def rename(key, rules):
    """First rule whose pattern matches the start of key -> the renamed key, or None."""
    for pattern, new in rules:
        m = re.match(pattern, key)
        if m:
            return m.expand(new) + key[m.end():]
    return None


def low_pass_radius(mask):
    """PixMIM's ideal low-pass mask (H, W), 1 inside (i - (H-1)/2)^2 + (j - (W-1)/2)^2 <= r^2 -> the roundest r
    that gives the same mask (40.0 for mmselfsup's 224 px filter)."""
    H, W = mask.shape[-2:]
    i, j = torch.arange(H, dtype=torch.float64) - (H - 1) / 2, torch.arange(W, dtype=torch.float64) - (W - 1) / 2
    d2 = i[:, None] ** 2 + j[None, :] ** 2
    inside = mask.reshape(H, W) > 0.5
    lo, hi = d2[inside].max().item(), d2[~inside].min().item() if (~inside).any() else math.inf
    if not lo < hi:
        raise InputError('target_generator.low_pass_filter is no circular low-pass mask: the file is damaged')
    mid = ((lo + hi) / 2) ** .5 if math.isfinite(hi) else lo ** .5 + 1   # between the last kept, first dropped
    return next(r for r in (*(round(mid, d) for d in (0, 1, 2, 3)), mid) if lo <= r * r < hi)


def openmmlab_levels(meta, count, depth):
    """MFF's fused blocks (the config's out_indices) -> (blocks, where they were read). Not in the weights:
    mmengine records the config text in meta['cfg']; without it, SPEC section 2's paper set for 6 levels."""
    cfg = meta.get('cfg') if isinstance(meta, dict) else None
    m = re.search(r'out_indices[\'"]?\s*[=:]\s*\[([\d,\s]+)\]', cfg) if isinstance(cfg, str) else None
    if m and len(levels := [int(v) for v in m.group(1).split(',') if v.strip()]) == count:
        return levels, 'levels from its config'
    if count == 6:                                                       # = mae_mff.paper_mff_layers(depth)
        return sorted({(i * (depth - 1)) // 5 for i in range(5)} | {depth - 1}), 'paper levels (no config in the file)'
    raise InputError(f'this MFF file fuses {count} levels and records no config that says which blocks: '
                     'resave it with its meta (mmengine writes meta["cfg"]) or convert it by hand')


def convert_openmmlab(state, meta, source):
    """OpenMMLab state dict -> (our checkpoint, description). Pre-training files (with `neck.`) become a
    mae_mff.py / pixmim_mff.py pre-training checkpoint that analyze.py rebuilds; others hold the encoder."""
    model, unknown = {}, []
    for k, v in state.items():
        new = rename(k, OPENMMLAB_NAMES)
        if new is None and not k.startswith(OPENMMLAB_IGNORED):
            unknown.append(k)
        elif new is not None:
            model[new] = v.reshape(-1) if new == 'mff.fusion_logits' else v
    if unknown:
        raise InputError(f'{source} is an OpenMMLab checkpoint with parts this project cannot map ({unknown[:3]}): '
                         'only MAE / MFF / PixMIM ViTs (timm-style blocks, no layer scale) convert')
    if not {'cls_token', 'pos_embed', 'patch_embed.proj.weight'} <= set(model):
        raise InputError(f'{source} is an OpenMMLab checkpoint without a ViT backbone with a [cls] token: '
                         'pass an MAE, MFF or PixMIM one')
    pixmim = 'target_generator.low_pass_filter' in state
    levels = len(model.get('mff.fusion_logits', ()))
    kind = ('fine-tuned' if 'head.weight' in model else 'pre-training' if 'decoder_embed.weight' in model
            else 'encoder')
    found = (f'OpenMMLab {"PixMIM" if pixmim else "MFF" if levels else "MAE"} {kind} checkpoint, '
             f'{vit_name(model)}' + (f', {levels} fusion levels' if levels else ''))
    if kind != 'pre-training':
        return {'model': model}, found
    dim, patch = model['cls_token'].shape[-1], model['patch_embed.proj.weight'].shape[-1]
    depth = 1 + max(int(k.split('.')[1]) for k in model if k.startswith('blocks.'))
    size = size_of_width(dim)
    if size is None:
        raise InputError(f'{source} has width {dim}, no standard ViT size, so mae_mff.py cannot rebuild it: '
                         'probe.py and finetune.py still read its encoder')
    # What the weights cannot say, from the OpenMMLab configs: norm_pix on, 16 decoder heads, mask ratio
    # 0.75, the simple crop for MFF and PixMIM (RandomResizedCrop for MAE), mmpretrain's weight-decay rule.
    args = dict(model=f'mae_vit_{size}_patch{patch}', depth=depth,                           # a --model name
                input_size=math.isqrt(model['pos_embed'].shape[1] - 1) * patch,
                decoder_embed_dim=model['decoder_embed.weight'].shape[0],
                decoder_depth=1 + max(int(k.split('.')[1]) for k in model if k.startswith('decoder_blocks.')),
                decoder_num_heads=16, norm_pix_loss=True, mask_ratio=0.75, mff_layers='none', mff_proj='linear',
                mff_fusion='weighted', mff_detach=False, crop='simple' if levels or pixmim else 'rrc',
                wd_rule='mmpretrain')
    if levels:
        blocks, where = openmmlab_levels(meta, levels, depth)
        args['mff_layers'] = ','.join(map(str, blocks))
        found += f' (blocks {blocks}: {where})'
    if pixmim:
        args['lpf_radius'] = low_pass_radius(state['target_generator.low_pass_filter'])
        found += f', low-pass radius {args["lpf_radius"]:g} px'
    return {'model': model, 'args': args, 'script': 'pixmim_mff.py' if pixmim else 'mae_mff.py'}, found


def convert_pilamim_public(state, source):
    """PiLaMIM's public pretrain.py state dict -> (our pilamim.py names for both encoders, description).

    Its encoders keep their position table as (L, 1, D) without a cls row (the cls token gets no position):
    (1, 1 + L, D) with a zero cls row is the same thing here. Its LayerNorms have eps 1e-5 (timm Block's
    default), which is not in the weights: recorded as args['norm_eps'], which read_architecture passes on.
    """
    rules = [(r'patchify\.', 'patch_embed.proj.'), (r'transformer\.(\d+)\.', r'blocks.\1.'),
             (r'layer_norm\.', 'norm.'), (r'(cls_token|pos_embedding)$', r'\1')]
    model = {}
    for prefix, ours in (('encoder.', ''), ('target_encoder.', 'target_encoder.')):
        for k, v in state.items():
            if not k.startswith(prefix):
                continue
            new = rename(k[len(prefix):], rules)
            if new is None:
                raise InputError(f'{source} looks like a PiLaMIM public-code state dict but {k} has no counterpart '
                                 'in a timm ViT: only their ViT encoders convert')
            if new == 'pos_embedding':                                   # (L, 1, D) -> (1, 1 + L, D)
                new, v = 'pos_embed', torch.cat([torch.zeros(1, v.shape[-1], dtype=v.dtype), v[:, 0]])[None]
            model[ours + new] = v
    dropped = sorted({k.split('.')[0] for k in state if not k.startswith(('encoder.', 'target_encoder.'))})
    found = (f'PiLaMIM public-code state dict, {vit_name(model)}, context encoder + EMA target encoder, '
             f'LayerNorm eps 1e-5' + (f' (not converted: {", ".join(dropped)})' if dropped else ''))
    return {'model': model, 'args': {'norm_eps': 1e-5}}, found


TIMM_VIT_KEYS = re.compile(r'(patch_embed\.proj|norm|fc_norm|head)\.(weight|bias)$|cls_token$|pos_embed$|'
                           r'blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$')


def timm_checkpoint(name):
    """`timm:NAME` -> (our checkpoint, description): timm.create_model(NAME, pretrained=True), read from the
    hub cache or fetched where the hub is reachable. Only plain ViTs with a [cls] token fit ViTEncoder."""
    import timm
    from huggingface_hub.constants import HF_HUB_CACHE
    if not timm.is_model(name):
        raise InputError(f"timm knows no model '{name}': pick one of timm.list_models('vit_*', pretrained=True), "
                         'e.g. timm:vit_base_patch16_224.mae')
    try:
        model = timm.create_model(name, pretrained=True)
    except RuntimeError as e:                                            # e.g. a tag without weights
        raise InputError(f'timm has no weights for {name} ({e}): list them with '
                         f"timm.list_models('{name.split('.')[0]}*', pretrained=True)") from None
    except OSError as e:
        raise InputError(f'cannot get the weights of timm:{name} ({type(e).__name__}): they are not in the Hugging '
                         f'Face cache {HF_HUB_CACHE} nor the torch hub cache {torch.hub.get_dir()}, and the hub is '
                         'out of reach: run once where it is reachable (the weights are then cached), or pass a '
                         'saved state dict') from None
    state = model.state_dict()
    extra = [k for k in state if not TIMM_VIT_KEYS.match(k)]
    if extra or getattr(model, 'no_embed_class', False) or 'cls_token' not in state:
        raise InputError(f'timm:{name} is no plain ViT with a [cls] token ({(extra or ["no cls position"])[:3]}): '
                         'pick a ViT such as timm:vit_base_patch16_224.mae')
    return ({'model': state, 'args': {'norm_eps': model.blocks[0].norm1.eps}},
            f'timm hub model {name}, {vit_name(state)}')


FORMATS = ("ours (mae_mff.py, pixmim_mff.py, pilamim.py, finetune.py), official MAE {'model': ...}, a bare timm ViT "
           "state dict, timm:NAME, OpenMMLab {'state_dict': ...} (mmpretrain MAE / MFF, mmselfsup MAE / PixMIM), "
           "PiLaMIM's public pretrain.py state dict")


def convert_checkpoint(ckpt, source):
    """A loaded checkpoint of any known format -> (the same in our own form, a one-line description of it).

    Our form: {'model': state dict in timm / mae_mff.py / pilamim.py names, 'args': recorded flags (if
    known), 'script': ...}: our checkpoints pass unchanged; official MAE ones too (already in timm names).
    """
    state = ckpt.get('state_dict', ckpt.get('model', ckpt))
    state = state if isinstance(state, dict) else {}
    if state and all(k.startswith('module.') for k in state):           # saved from the DDP wrapper
        state = {k[len('module.'):]: v for k, v in state.items()}
    if 'backbone.patch_embed.projection.weight' in state:
        return convert_openmmlab(state, ckpt.get('meta'), source)
    if 'encoder.patchify.weight' in state and 'encoder.transformer.0.attn.qkv.weight' in state:
        return convert_pilamim_public(state, source)
    if not {'patch_embed.proj.weight', 'cls_token', 'pos_embed'} <= set(state):
        raise InputError(f'{source} is in no format this project reads (first keys {list(state)[:4]}): it reads '
                         f'{FORMATS}')
    recorded = ckpt.get('args')
    if 'script' in ckpt or isinstance(recorded, dict):                   # ours: the args are a dict
        script = ckpt.get('script') or 'our'
        return {**ckpt, 'model': state}, f'{script} checkpoint, {vit_name(state)}'
    if 'model' in ckpt:
        kind = ('fine-tuned (fc_norm + head)' if 'head.weight' in state and 'norm.weight' not in state else
                'pre-training' + (' with decoder' if 'decoder_embed.weight' in state else ''))
        return {**ckpt, 'model': state}, f'official MAE {kind} checkpoint, {vit_name(state)}'
    return {'model': state}, f'timm ViT state dict, {vit_name(state)}'


def read_checkpoint(path, flag='--checkpoint'):
    """A file of any known format, or `timm:NAME` -> (checkpoint in our own form, description)."""
    if path.startswith('timm:'):
        return timm_checkpoint(path[len('timm:'):])
    return convert_checkpoint(load_checkpoint(path, flag), path)


def read_architecture(state, recorded, num_heads_flag):
    """Shapes in the weights are the truth; num_heads (it has no shape) needs a name or a flag, and the
    LayerNorm eps comes from the format (recorded as 'norm_eps' where it is not MAE's 1e-6)."""
    dim = state['cls_token'].shape[-1]
    depth = 1 + max(int(k.split('.')[1]) for k in state if k.startswith('blocks.'))
    patch = state['patch_embed.proj.weight'].shape[-1]
    grid = math.isqrt(state['pos_embed'].shape[1] - 1)                   # pos_embed (1, 1 + g*g, D)
    size = size_of(recorded.get('model'))[0] or size_of_width(dim)
    heads = VIT_SIZES[size]['num_heads'] if size else num_heads_flag
    if heads is None:
        raise InputError(f'width {dim} is no standard ViT size, so the number of heads is unknown: pass --num_heads')
    return dict(img_size=grid * patch, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                mlp_ratio=state['blocks.0.mlp.fc1.weight'].shape[0] / dim,
                qkv_bias='blocks.0.attn.qkv.bias' in state,               # PiLaMIM's blocks have none
                norm_eps=recorded.get('norm_eps', 1e-6))


def read_encoder(path, args, check_input_size=True):
    """-> (encoder state dict, architecture, whole checkpoint in our form, what the file is). Flags that
    contradict the weights are an error.

    --model/--patch_size/--num_heads (and --input_size, unless the caller resizes to it) are only checks.
    """
    ckpt, found = read_checkpoint(path)
    full = ckpt['model']
    state = encoder_state_dict(full)                 # context encoder for PiLaMIM; drops decoder, MFF, head
    if 'norm.weight' not in state and 'fc_norm.weight' in full:
        # finetune.py (timm, global_pool='avg') keeps its final norm after pooling as fc_norm; as the encoder's
        # norm it makes probe.py's `mean` pooling, norm(mean(patch tokens)), the fine-tuned model's own feature
        state.update({'norm.weight': full['fc_norm.weight'], 'norm.bias': full['fc_norm.bias']})
    recorded = ckpt['args'] if isinstance(ckpt.get('args'), dict) else {}
    arch = read_architecture(state, recorded, args.num_heads)
    wanted = {}
    if args.model:
        size, patch = size_of(args.model)
        if size is None:
            raise InputError(f"--model '{args.model}' names no ViT size: use e.g. mae_vit_base_patch16, or omit it")
        wanted.update(VIT_SIZES[size], patch_size=patch)
    wanted.update({k: v for k, v in (('patch_size', args.patch_size),
                                     ('img_size', args.input_size if check_input_size else None),
                                     ('num_heads', args.num_heads)) if v})
    clash = [f'{k} {arch[k]} there, {v} asked' for k, v in wanted.items() if arch[k] != v]
    if clash:
        raise InputError(f'{path} was made for another architecture ({", ".join(clash)}): drop --model/--input_size/'
                         '--patch_size/--num_heads (they are read from the checkpoint) or pass the right checkpoint')
    return state, arch, ckpt, found


def load_encoder(path, args):
    """-> (frozen ViTEncoder in eval mode (probing), what the file is). The weights are never partly loaded."""
    state, arch, _, found = read_encoder(path, args)
    encoder = ViTEncoder(**arch)
    load_matching_state(encoder, state, path)                             # strict: every encoder key
    return encoder.requires_grad_(False).eval(), found


# ----------------------------------------------------------------------------------------------
# Data: ImageNet-style folders, or the built-in procedurally generated shapes.

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class SyntheticShapes(torch.utils.data.Dataset):
    """Built-in data needing no files: 1-4 objects of one shape on a textured background.

    Image i is the same for a given (seed, i), at any size. Two label kinds of the same images:
    'shape' (circle / square / triangle / ring: semantics) and 'count' (1-4 objects: low-level
    detail, in the spirit of CLEVR/Count that PiLaMIM probes). Chance is 25% for both.
    """
    SHAPES = ('circle', 'square', 'triangle', 'ring')

    def __init__(self, num_images=4096, img_size=32, label='shape', seed=0, transform=None):
        if label not in ('shape', 'count'):
            raise InputError(f"unknown built-in label kind '{label}': use 'shape' or 'count'")
        self.num_images, self.img_size, self.label, self.seed = num_images, img_size, label, seed
        self.transform = transform
        self.classes = list(self.SHAPES) if label == 'shape' else ['1', '2', '3', '4']

    def __len__(self):
        return self.num_images

    def draw(self, i):
        """-> (uint8 image (S, S, 3), shape id, object count)."""
        rng = np.random.default_rng([self.seed, i])
        S = self.img_size
        shape, count = int(rng.integers(4)), int(rng.integers(1, 5))
        y, x = np.mgrid[0:S, 0:S].astype(np.float32) / S                  # coordinates in [0, 1)
        c0, c1 = rng.uniform(0, 0.45, 3), rng.uniform(0, 0.45, 3)        # dark gradient background
        t = np.clip(x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1) + 0.5, 0, 1)[..., None]
        img = c0 * (1 - t) + c1 * t + rng.normal(0, 0.03, (S, S, 3))
        cells = rng.choice(9, size=count, replace=False)                 # 3x3 grid: no overlaps
        for cell in cells:
            r = rng.uniform(0.09, 0.14)
            cy = (cell // 3 + 0.5 + rng.uniform(-0.1, 0.1)) / 3
            cx = (cell % 3 + 0.5 + rng.uniform(-0.1, 0.1)) / 3
            dy, dx = y - cy, x - cx
            if shape == 0:
                inside = dx ** 2 + dy ** 2 <= r ** 2
            elif shape == 1:
                inside = np.maximum(abs(dx), abs(dy)) <= 0.8 * r
            elif shape == 2:
                inside = (dy <= 0.8 * r) & (abs(dx) <= 0.6 * (dy + r))
            else:
                inside = (dx ** 2 + dy ** 2 <= r ** 2) & (dx ** 2 + dy ** 2 >= (0.55 * r) ** 2)
            img[inside] = rng.uniform(0.55, 1.0, 3)                       # bright object colour
        return (np.clip(img, 0, 1) * 255).astype(np.uint8), shape, count

    @property
    def targets(self):
        """Every image's label, like ImageFolder.targets (draws each image once)."""
        return [s if self.label == 'shape' else c - 1 for _, s, c in map(self.draw, range(self.num_images))]

    def __getitem__(self, i):
        pixels, shape, count = self.draw(i)
        img = Image.fromarray(pixels)
        if self.transform is not None:
            img = self.transform(img)
        return img, (shape if self.label == 'shape' else count - 1)


def load_rgb(path):
    """PIL loader that converts every mode (L, P, CMYK, RGBA) to RGB and names corrupt files."""
    with named_errors(path):
        with open(path, 'rb') as f:
            return Image.open(f).convert('RGB')


@contextmanager
def named_errors(path, kinds=(OSError, SyntaxError, ValueError)):
    """A decoder's exception while reading `path` -> the one-line InputError that names the file."""
    try:
        yield
    except InputError:
        raise
    except kinds as e:
        raise InputError(f'cannot read image {path} ({type(e).__name__}): delete or replace the file') from None


def open_with_bytes(path):
    """Loader of the draft and --gpu_decode paths: (the file's bytes as a uint8 tensor, the image opened
    lazily from them: PIL has read the header only (size, format, mode), path)."""
    with named_errors(path):
        with open(path, 'rb') as f:
            data = f.read()
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), Image.open(io.BytesIO(data)), path


def geometry(kind, size, scale=(0.2, 1.0)):
    """The reference torchvision geometry on a PIL image, flip included, which the faster paths reproduce.

    'rrc': MAE's RandomResizedCrop(scale), bicubic; 'simple': PixMIM's resize + padded random crop;
    'center': the evaluation view, resize to size/0.875 (256 for 224), bicubic, then center crop.
    The simple crop pads by `simple_crop_padding(size)`, the reference's 4 px at 224 scaled with the
    image (1 px at 32), as the low-pass radius is: a fixed 4 px would shift a 32-px image by a whole
    4-px patch, a far stronger augmentation than the recipe means. The simple crop resizes with torchvision's default (bilinear) interpolation, as mmselfsup's
    PixMIM and mmpretrain's MFF configs do: their published numbers come from it.
    """
    if kind == 'rrc':
        return [transforms.RandomResizedCrop(size, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.RandomHorizontalFlip()]
    if kind == 'simple':
        return [transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
                transforms.RandomCrop(size, padding=simple_crop_padding(size), padding_mode='reflect'),
                transforms.RandomHorizontalFlip()]
    if kind == 'center':
        return [transforms.Resize(eval_resize(size), interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(size)]
    raise InputError(f"unknown --crop '{kind}': use 'rrc' or 'simple'")


def simple_crop_padding(size):
    """PixMIM's RandomCrop padding, 4 px at 224, in proportion to the image: round(4 size / 224)."""
    return int(round(4 * size / 224))


def eval_resize(size):
    return int(round(size / 0.875))


def train_transform(input_size, crop='rrc'):
    """The float reference pipeline: geometry -> ToTensor -> Normalize, all in the loader worker.

    The training scripts load through ImageView (uint8, normalised on the device by to_device), whose
    pixels are tested against this; analyze.py still reads normalised float batches from it.
    """
    return transforms.Compose(geometry(crop, input_size) + [transforms.ToTensor(),
                                                            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(input_size):
    """Float evaluation view (Resize(size/0.875) + CenterCrop), the reference of ImageView('center')."""
    return transforms.Compose(geometry('center', input_size) + [transforms.ToTensor(),
                                                                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def short_side_resize(w, h, size):
    """torchvision's Resize(int) output (w, h): the short side becomes `size`, the long one is truncated."""
    return (size, int(size * h / w)) if w <= h else (int(size * w / h), size)


def uint8_chw(img):
    """PIL RGB image -> uint8 tensor (3, H, W); the float conversion happens on the device (to_device)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class Encoded:
    """One --gpu_decode sample: the JPEG bytes and the geometry drawn for them, or, for a file the device
    decoder cannot take (PNG, CMYK, ...), the finished uint8 pixels of the CPU path."""

    def __init__(self, path, view, data=None, params=None, pixels=None):
        self.path, self.data, self.params, self.pixels = path, data, params, pixels
        self.kind, self.size = view.kind, view.size                       # the geometry to apply on the device


class ImageView:
    """How one image becomes a model input: a uint8 (3, size, size) tensor after crop, resize and flip.

    kind: 'rrc' / 'simple' / 'center' (see `geometry`). decode:
      'exact'  PIL full decode + the reference torchvision geometry (its pixels bit for bit, as uint8);
      'draft'  JPEG files: PIL draft mode (the decoder's DCT-domain downscale by 2, 4 or 8, chosen so
               the crop still has at least `size` pixels both ways at the reduced scale), then one
               resize of the crop box only, by torch's uint8 antialiased kernel (crop_resize_flip, the
               code the device path runs) instead of PIL's crop-then-resize; other files and
               in-memory images take the exact path;
      'gpu'    the worker reads the bytes and draws the geometry; the training process decodes and
               crops on the device (EncodedBatch.decode). Files the device cannot decode go the
               draft way in the worker.
    Every path makes the same random draws in the same order as the reference (crop, then flip),
    so the RNG stream and exact resume do not depend on the path.
    """

    def __init__(self, kind, size, decode='exact', scale=(0.2, 1.0)):
        self.kind, self.size, self.decode, self.scale = kind, size, decode, scale
        self.reference = transforms.Compose(geometry(kind, size, scale))
        self.loader = load_rgb if decode == 'exact' else open_with_bytes

    def __repr__(self):
        return f'ImageView({self.kind!r}, {self.size}, decode={self.decode!r})'

    def __call__(self, img):
        """PIL image (exact path, built-in data) or open_with_bytes' triple -> uint8 tensor or Encoded."""
        if not isinstance(img, tuple):                                  # load_rgb's or a built-in image
            return uint8_chw(self.reference(img if img.mode == 'RGB' else img.convert('RGB')))
        data, img, path = img
        jpeg = img.format == 'JPEG' and img.mode in ('RGB', 'L')        # what decode_jpeg reads
        with named_errors(path, (OSError, SyntaxError, ValueError, RuntimeError)):  # decode_jpeg: RuntimeError
            if self.decode == 'gpu' and jpeg:
                return Encoded(path, self, data=data, params=self.draw(*img.size))
            pixels = self.draft(img, data if jpeg else None) if img.format == 'JPEG' else \
                uint8_chw(self.reference(img.convert('RGB')))           # PNG, ...: the exact path
            return Encoded(path, self, pixels=pixels) if self.decode == 'gpu' else pixels

    def draw(self, w, h):
        """The reference's random draws for a w x h image -> (crop or resize parameters, flip)."""
        size = self.size
        if self.kind == 'rrc':       # get_params reads only the size: an empty (0, h, w) tensor stands in
            params = transforms.RandomResizedCrop.get_params(torch.empty(0, h, w), self.scale, (3 / 4, 4 / 3))
        elif self.kind == 'simple':  # RandomCrop.get_params on the resized, padded image
            rw, rh = short_side_resize(w, h, size)
            pad = 2 * simple_crop_padding(size)
            i = torch.randint(0, rh + pad - size + 1, size=(1,)).item()
            j = torch.randint(0, rw + pad - size + 1, size=(1,)).item()
            params = (rw, rh, i, j)
        else:
            return short_side_resize(w, h, eval_resize(size)), False
        return params, bool(torch.rand(1) < 0.5)                       # RandomHorizontalFlip's draw

    def draft(self, img, data=None):
        """JPEG draft mode, then `crop_resize_flip` on the tensor; the reference's draws. -> uint8 (3, S, S).

        PIL's draft picks the largest DCT-domain reduction s in {1, 2, 4, 8} that keeps the decoded
        image at least `need` big, i.e. the crop at least `size` pixels both ways; the crop box is then
        divided by s (rounded to whole pixels of the reduced image). Where s is 1 and the bytes are
        given (an RGB or grey JPEG), torchvision's decode_jpeg decodes them instead of PIL (~20% faster).
        """
        W, H = img.size
        params, flip = self.draw(W, H)
        drafted = img.draft('RGB', self.draft_need(W, H, params))       # None: not reducible (e.g. drafted already)
        s = W / drafted[1][2] if drafted else 1
        if self.kind == 'rrc' and s > 1:
            i, j, h, w = params
            top, left, bottom, right = (round(v / s) for v in (i, j, i + h, j + w))
            params = (top, left, bottom - top, right - left)
        if s == 1 and data is not None:
            pixels = decode_jpeg(data, mode=ImageReadMode.RGB)         # (3, H, W), channels-last memory
        else:
            pixels = torch.from_numpy(np.array(img.convert('RGB'))).permute(2, 0, 1)
        return crop_resize_flip(pixels, self.kind, self.size, params, flip)

    def draft_need(self, W, H, params):
        """The smallest decoded size (w, h) of a W x H image that keeps the drawn crop >= size both ways."""
        if self.kind == 'rrc':
            _, _, h, w = params
            return math.ceil(W * self.size / w), math.ceil(H * self.size / h)
        return params[:2]                                              # the short-side resize target (w, h)


def crop_resize_flip(img, kind, size, params, flip):
    """uint8 (3, H, W) -> uint8 (3, size, size) on img's device: the reference geometry with drawn parameters.

    interpolate(antialias=True) has PIL's filters (bicubic a = -0.5, triangle), widened when
    downscaling. On the CPU it runs the uint8 kernel (several times faster than PIL's resize, PIL's
    rounding); elsewhere in float, rounded back to uint8 as PIL's output is.
    """
    def resize(x, hw, mode):
        if x.device.type == 'cpu':
            return torch.nn.functional.interpolate(x[None], size=hw, mode=mode, antialias=True)[0]
        y = torch.nn.functional.interpolate(x[None].float(), size=hw, mode=mode, antialias=True)[0]
        return y.round_().clamp_(0, 255).to(torch.uint8)

    if kind == 'rrc':
        i, j, h, w = params
        img = resize(img[:, i:i + h, j:j + w], (size, size), 'bicubic')
    elif kind == 'simple':
        rw, rh, i, j = params
        pad = simple_crop_padding(size)
        img = torch.nn.functional.pad(resize(img, (rh, rw), 'bilinear')[None], (pad,) * 4, mode='reflect')[0]
        img = img[:, i:i + size, j:j + size]
    else:
        rw, rh = params
        img = resize(img, (rh, rw), 'bicubic')
        top, left = int(round((rh - size) / 2.)), int(round((rw - size) / 2.))  # CenterCrop's offsets
        img = img[:, top:top + size, left:left + size]
    return (img.flip(-1) if flip else img).contiguous()


class EncodedBatch:
    """A --gpu_decode batch as the loader delivers it; `decode(device)` -> uint8 (N, 3, S, S) there."""

    def __init__(self, items):
        self.items = items

    def pin_memory(self):                                              # called by the DataLoader's pin thread
        for e in self.items:
            e.data = e.data.pin_memory() if e.data is not None else None
            e.pixels = e.pixels.pin_memory() if e.pixels is not None else None
        return self

    def decode(self, device):
        """Batched torchvision.io.decode_jpeg on `device` (nvjpeg on CUDA), then the drawn geometry there.

        If the batched call fails, each image is retried alone, then on the CPU decoder; a file no
        decoder reads is the one-line error naming it.
        """
        jpegs = [e for e in self.items if e.data is not None]
        try:
            decoded = decode_jpeg([e.data for e in jpegs], mode=ImageReadMode.RGB, device=device) if jpegs else []
        except RuntimeError:
            decoded = [decode_one(e, device) for e in jpegs]
        decoded = iter(decoded)
        out = []
        for e in self.items:
            if e.data is None:
                out.append(e.pixels.to(device, non_blocking=True))
            else:
                out.append(crop_resize_flip(next(decoded), e.kind, e.size, *e.params))
        return torch.stack(out)

def decode_one(e, device):
    """One JPEG on `device`, else on the CPU decoder; neither -> the one-line error naming the file."""
    try:
        return decode_jpeg(e.data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        with named_errors(e.path, (RuntimeError,)):
            return decode_jpeg(e.data, mode=ImageReadMode.RGB).to(device)


def collate(batch):
    """default_collate, except that --gpu_decode samples become one EncodedBatch (bytes of varying length)."""
    if isinstance(batch[0][0], Encoded):
        return EncodedBatch([b[0] for b in batch]), torch.utils.data.default_collate([b[1] for b in batch])
    return torch.utils.data.default_collate(batch)


def to_device(imgs, device):
    """A loader batch -> float (N, 3, S, S) on `device`, ImageNet-normalised there (every script calls this).

    uint8 batches (4x fewer bytes than float to pin and copy) are converted and normalised on the
    device with ToTensor + Normalize's own arithmetic, so the values are train_transform's to float rounding;
    EncodedBatch is decoded there first; float batches (finetune.py's timm pipeline) only move.
    """
    if isinstance(imgs, EncodedBatch):
        imgs = imgs.decode(device)
    imgs = imgs.to(device, non_blocking=True)
    if imgs.dtype != torch.uint8:
        return imgs
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return imgs.float().div(255).sub(mean).div(std)


def decode_mode(args):
    """'gpu' (--gpu_decode), 'exact' (--exact_decode) or 'draft' (the default)."""
    if getattr(args, 'gpu_decode', False) and getattr(args, 'exact_decode', False):
        raise InputError('--gpu_decode and --exact_decode exclude each other: --exact_decode is the CPU '
                         'full decode; pass one of them')
    return 'gpu' if getattr(args, 'gpu_decode', False) else 'exact' if getattr(args, 'exact_decode', False) else 'draft'


def train_view(args, crop, scale=(0.2, 1.0)):
    """The training view of --crop (rrc: RandomResizedCrop(scale) bicubic; simple) with the decode flags' path."""
    return ImageView(crop, args.input_size, decode_mode(args), scale)


def eval_view(args):
    """Resize to input_size/0.875 (256 for 224), bicubic, center crop: the standard evaluation view."""
    return ImageView('center', args.input_size, decode_mode(args))


def describe_decode(args):
    """The start line's words for the decode path in use."""
    if not args.data_path:
        return 'built-in images, uint8 to the device'
    return {'gpu': 'JPEG decode on the device (--gpu_decode)', 'exact': 'full CPU decode (--exact_decode)',
            'draft': 'CPU decode in JPEG draft mode + box resize'}[decode_mode(args)] + ', uint8 to the device'


def build_dataset(args, split, transform):
    """`args.data_path`/<split>/<class>/<image> if --data_path is given, else the built-in shapes.

    An ImageView transform brings its own file loader (full decode, lazy open for draft mode, bytes for
    --gpu_decode); any other transform gets the full-decode RGB loader.
    """
    gpu = getattr(transform, 'decode', None) == 'gpu'
    if getattr(args, 'gpu_decode', False) and not gpu:
        raise InputError("--gpu_decode is not available here: finetune.py keeps timm's CPU augmentations "
                         '(RandAugment, random erasing on float tensors); drop --gpu_decode')
    if not args.data_path:
        if gpu:
            raise InputError('--gpu_decode decodes JPEG files, and the built-in images are made in memory: '
                             'pass --data_path with JPEGs, or drop --gpu_decode')
        # --builtin_val_size / --builtin_seed (add_builtin_eval_args) where a script has them, else today's rule
        val_size, seed = getattr(args, 'builtin_val_size', None), getattr(args, 'builtin_seed', None)
        val_size = max(args.builtin_size // 4, 256) if val_size is None else val_size
        seed = args.seed if seed is None else seed
        return SyntheticShapes(args.builtin_size if split == 'train' else val_size, args.input_size,
                               label=args.builtin_label, seed=seed * 2 + (split != 'train'), transform=transform)
    root = os.path.join(args.data_path, split)
    if not os.path.isdir(root):
        raise InputError(f'no {split}/ folder in --data_path {args.data_path}: expected '
                         f'{root}/<class>/<image> (ImageNet layout), or omit --data_path for the built-in data')
    try:
        dataset = datasets.ImageFolder(root, transform=transform, loader=getattr(transform, 'loader', load_rgb))
    except FileNotFoundError as e:
        raise InputError(f'{root} holds no images ({e}): put images in {root}/<class>/') from None
    return dataset


class EvalShard(torch.utils.data.Sampler):
    """Rank r of W reads images r, r+W, r+2W, ...: every image exactly once, no padding, so shards
    differ in length by at most one (DistributedSampler would pad them with duplicates)."""

    def __init__(self, dataset, rank, world_size):
        self.indices = range(rank, len(dataset), world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)

    def set_epoch(self, epoch):
        """Evaluation order never changes; kept so callers can treat both samplers alike."""


class EpochSeeded(torch.utils.data.Sampler):
    """Each pass draws the loader workers' base seed from the torch RNG, exactly where and as a fresh
    DataLoader iterator does, and sends it along with every index (to WorkerSeeded)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __len__(self):
        return len(self.sampler)

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        base = int(torch.empty((), dtype=torch.int64).random_().item())
        return ((i, base) for i in self.sampler)


class WorkerSeeded(torch.utils.data.Dataset):
    """Re-seeds a loader worker when a new pass's base seed arrives, as DataLoader seeds a new worker
    (random and torch with base + worker id, numpy from both). Persistent workers then draw the same
    augmentations as fresh per-epoch workers: exact resume survives them."""

    def __init__(self, dataset):
        self.dataset, self.base = dataset, None

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        i, base = item
        worker = torch.utils.data.get_worker_info()
        if worker is not None and base != self.base:                    # in the main process: its own RNGs
            self.base = base
            random.seed(base + worker.id)
            torch.manual_seed(base + worker.id)
            np.random.seed(_generate_state(base, worker.id))
        return self.dataset[i]


def make_loader(dataset, batch_size, rank, world_size, num_workers, train=True, seed=0, accum_iter=1):
    """DataLoader over this rank's shard. Training: shuffled by (seed, epoch), equal shards, ragged
    tail dropped. Evaluation (train=False): EvalShard, each image counted exactly once in all.

    Workers persist across epochs and keep 4 batches each in flight; they are re-seeded per pass from
    the torch RNG (EpochSeeded / WorkerSeeded), so augmentations follow (seed, epoch) as before.
    The loader's own generator only seeds workers at start-up, which WorkerSeeded overrides.
    """
    if batch_size < 1:
        raise InputError(f'batch size {batch_size} < 1: give --batch_size of at least 1 (per GPU)')
    if train and len(dataset) < batch_size * world_size * accum_iter:
        raise InputError(f'dataset has {len(dataset)} images, fewer than one optimizer step needs '
                         f'({batch_size} x {accum_iter} accum_iter x {world_size} processes): '
                         'lower --batch_size or --accum_iter, or add data')
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                                  seed=seed, drop_last=True) if train else \
        EvalShard(dataset, rank, world_size)
    workers = dict(persistent_workers=True, prefetch_factor=4) if num_workers else {}
    loader = torch.utils.data.DataLoader(
        WorkerSeeded(dataset), batch_size=batch_size, sampler=EpochSeeded(sampler), num_workers=num_workers,
        collate_fn=collate, pin_memory=torch.cuda.is_available(), drop_last=train,
        generator=torch.Generator().manual_seed(seed), **workers)
    return loader, sampler


# ----------------------------------------------------------------------------------------------
# Distributed: one code path for `python script.py` and `torchrun --nproc_per_node=N script.py`.

def init_distributed():
    """-> (rank, world_size, device). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK."""
    rank = int(os.environ.get('RANK', 0))
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if torch.cuda.is_available():
        device = torch.device('cuda', local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True                     # fp32 leftovers use tensor cores
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device('cpu')
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world_size, device


def compile_model(model):
    """torch.compile for --compile. Inductor's own random numbers would give other masks (and drop
    paths) than eager mode for the same seed; fallback_random keeps torch's, so --compile changes the
    speed and not the run (a run may resume with or without it)."""
    import torch._inductor.config
    torch._inductor.config.fallback_random = True
    return torch.compile(model)


def wrap_ddp(model, device, world_size):
    return DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None) \
        if world_size > 1 else model


def no_sync_unless(model, sync):
    """Skip DDP's gradient all-reduce on non-final accumulation micro-steps (wrap forward+backward)."""
    return model.no_sync() if isinstance(model, DistributedDataParallel) and not sync else nullcontext()


def topk_hits(scores, y, num_classes):
    """-> tensor [top-1 hits, top-5 hits (0 when < 5 classes), count]."""
    top = scores.topk(min(5, num_classes), dim=1).indices                # (N, k)
    hit = top == y[:, None]
    return torch.stack([hit[:, 0].sum(), hit.any(1).sum() if num_classes >= 5 else hit[:, 0].sum() * 0,
                        torch.tensor(len(y), device=y.device)]).double()


def accuracy(hits, world_size, num_classes):
    """Summed topk_hits of every rank -> (top-1 %, top-5 % or None). Evaluation shards are unpadded
    (make_loader(train=False)), so under torchrun every image counts exactly once."""
    if world_size > 1:
        dist.all_reduce(hits)
    top1, top5, n = hits.tolist()
    n = max(n, 1)
    return 100 * top1 / n, (100 * top5 / n if num_classes >= 5 else None)


def seed_epoch(seed, epoch, rank):
    """Re-seed every RNG at an epoch start from (seed, epoch, rank) alone.

    Masks, augmentations, Mixup and loader worker seeds then depend only on where training is, so a run
    resumed from an epoch checkpoint continues exactly as the uninterrupted run would have. timm's
    RandAugment, crops and erasing draw from python's `random` (in the main process with 0 workers;
    DataLoader seeds each worker's `random` from the torch RNG), Mixup from numpy.
    """
    state = np.random.SeedSequence([seed, epoch, rank]).generate_state(3)
    torch.manual_seed(int(state[0]))
    np.random.seed(int(state[1]))
    random.seed(int(state[2]))                                           # timm's RandAugment, crops, erasing


BF16_ON_CPU = False          # tests set it: the CUDA path's bf16 casts, run by CPU autocast


def autocast(device):
    """bf16 autocast on CUDA (no grad scaler needed, unlike fp16); plain fp32 on CPU unless BF16_ON_CPU."""
    if device.type == 'cuda' or BF16_ON_CPU:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


# ----------------------------------------------------------------------------------------------
# Optimisation: lr scaling, warmup + cosine, AdamW parameter groups.

def scale_lr(args, world_size):
    """MAE rule: lr = blr * effective batch / 256, unless --lr is given. Sets args.lr; -> effective batch."""
    eff_batch = args.batch_size * args.accum_iter * world_size
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    return eff_batch


def lr_at(epoch, args):
    """Linear warmup, then half-cycle cosine to min_lr; `epoch` is fractional (per-iteration)."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1. + math.cos(math.pi * min(progress, 1.)))


def set_lr(optimizer, lr):
    """Set every group's lr, times the group's 'lr_scale' if it has one (layer-wise lr decay)."""
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.)


WD_RULES = ('mae', 'mmpretrain', 'all')
MMPRETRAIN_NO_DECAY = ('bias', 'pos_embed', 'mask_token', 'cls_token')  # substrings, as mmpretrain matches


def param_groups(model, weight_decay, rule):
    """AdamW groups by the weight-decay rule of the reference run that produced a method's numbers.

    'mae':        official MAE (timm's old add_weight_decay, no skip list): only 1-D parameters and
                  biases are exempt, so cls_token and mask_token ARE decayed.
    'mmpretrain': MFF-MAE, PixMIM, MFF-PixMIM: norms ('ln*' there), biases, pos_embed, mask_token and
                  cls_token are exempt; everything else is decayed, MFF's fusion logits included.
    'all':        PiLaMIM's public code: every parameter is decayed.
    Frozen parameters (the fixed sin-cos tables, PiLaMIM's target encoder) get no group at all.
    """
    if rule not in WD_RULES:
        raise InputError(f"unknown --wd_rule '{rule}': use one of {', '.join(WD_RULES)}")
    norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if rule == 'mae':
            skip = p.ndim == 1 or name.endswith('.bias')
        elif rule == 'mmpretrain':
            skip = id(p) in norms or any(key in name for key in MMPRETRAIN_NO_DECAY)
        else:
            skip = False
        (no_decay if skip else decay).append(p)
    return [{'params': no_decay, 'weight_decay': 0.}, {'params': decay, 'weight_decay': weight_decay}]


def adamw(model, args, device, betas=(0.9, 0.95)):
    # fused=True: one CUDA kernel for the whole update instead of a loop over parameters.
    return torch.optim.AdamW(param_groups(model, args.weight_decay, args.wd_rule), lr=args.lr, betas=betas,
                             fused=device.type == 'cuda')


class LossTracker:
    """Sums the loss on the device and remembers the first non-finite step, without host syncs.

    Reading it (`mean()` / `check()`) synchronises, so the loop does that only at log points. One
    tracker serves a whole run: it knows the process (rank, world size) and `checkpoint`, the last
    good checkpoint its NaN message names (main sets it after each save); `start()` empties it for
    the next epoch.
    """

    def __init__(self, device, rank=0, world_size=1, names=('loss',), checkpoint=None):
        self.device, self.rank, self.world_size, self.names = device, rank, world_size, names
        self.checkpoint = checkpoint
        self.start()

    def start(self):
        self.sums = torch.zeros(len(self.names), device=self.device, dtype=torch.float64)
        self.count = 0
        self.first_bad = torch.full((), -1, device=self.device, dtype=torch.long)

    def add(self, step, *values):
        v = torch.stack([x.detach().double() for x in values])
        bad = ~torch.isfinite(v).all()
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, step),
                                     self.first_bad)
        self.sums += v
        self.count += 1

    def check(self):
        """Raise if any rank saw a non-finite loss. Every rank calls this at the same steps, so one
        small all-reduce here lets all of them stop together instead of leaving the others hanging."""
        bad = self.first_bad
        if dist.is_initialized():
            never = torch.iinfo(torch.long).max
            bad = torch.where(bad < 0, torch.full_like(bad, never), bad)
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)                   # earliest bad step of any rank
            bad = torch.where(bad == never, torch.full_like(bad, -1), bad)
        bad = int(bad)
        if bad >= 0:
            raise NonFiniteLossError(
                f'non-finite loss at step {bad}; nothing was saved after it ({self.checkpoint or "no checkpoint yet"} '
                'is intact): lower --blr or raise --warmup_epochs, then --resume auto')

    def mean(self, world_size=None):
        """-> {name: mean} over this epoch's steps of every rank (world_size=1: this rank only, no collective)."""
        world_size = self.world_size if world_size is None else world_size
        sums = self.sums.clone()
        if world_size > 1:
            dist.all_reduce(sums)
        return {n: float(s) / max(self.count * world_size, 1) for n, s in zip(self.names, sums)}


# ----------------------------------------------------------------------------------------------
# Checkpoints: {'model', 'optimizer', 'epoch' (completed), 'step', 'args', ...}, written atomically.

def save_checkpoint(state, path):
    """Write to a temporary file, fsync, then rename: a kill mid-write leaves the old file intact.

    On any failure the temporary file is removed (a partial file would keep a full disk full); a
    full disk becomes a one-line DiskFullError.
    """
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not disk_full(e):
            raise
        kept = f'the previous {path} is intact' if os.path.exists(path) else f'{path} was not written'
        raise DiskFullError(f'disk full while writing {path}: {kept} and the partial file is removed; free space '
                            f'in {os.path.dirname(path) or "."}, then rerun with --resume auto') from None


def disk_full(e):
    """Is ENOSPC/EDQUOT anywhere in the chain? torch's zip writer wraps the OSError in a RuntimeError."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def remove_stale_temp_files(output_dir):
    """Delete checkpoint-*.pth.tmp<pid> files whose writer is dead (killed mid-write, or a full disk)."""
    for name in os.listdir(output_dir):
        m = re.fullmatch(r'checkpoint-.+\.pth\.tmp(\d+)', name)
        if m and not pid_alive(int(m.group(1))):
            os.remove(os.path.join(output_dir, name))
            print(f'removed {name}, the partial checkpoint of a process that no longer runs', flush=True)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                                              # exists, owned by another user
        pass
    return True


def opaque_class(name):
    """Stand-in for a class a checkpoint pickles beside its tensors (mmengine's MessageHub buffers, numpy
    scalars in OpenMMLab's `meta`): it runs none of that class's code, so loading stays as safe as weights_only."""
    class Opaque:
        def __init__(self, *args, **kwargs):
            self.args = args

        def __setstate__(self, state):
            self.state = state
    Opaque.__name__ = Opaque.__qualname__ = name
    return Opaque


def load_checkpoint(path, flag='--checkpoint'):
    """torch.load(weights_only=True) with one-line errors that point at `flag`, the option that named the file.

    Objects other than tensors and containers (OpenMMLab's training state) load as inert stand-ins; a file
    that is a pickled module (torch.save(model), like PiLaMIM's linear-probe files), not a dict, is refused.
    """
    if not os.path.isfile(path):
        hint = ('check the path, or use --resume auto to continue from the latest checkpoint in --output_dir'
                if flag == '--resume' else f'check the {flag} path')
        raise InputError(f'checkpoint {path} does not exist: {hint}')

    def pickled(what):
        return InputError(f'{path} is a pickled {what}, not a state dict: where its class can be imported, run '
                          'm = torch.load(path, weights_only=False); torch.save(m.module.state_dict() (DDP-wrapped) '
                          f'or m.state_dict(), "weights.pth") and point {flag} at weights.pth')
    stand_ins = []                                                       # one more per class met
    while True:
        try:  # official MAE checkpoints pickle their args as an argparse.Namespace
            with torch.serialization.safe_globals([argparse.Namespace, *stand_ins]):
                ckpt = torch.load(path, map_location='cpu', weights_only=True)
            break
        except Exception as e:  # truncated, not a checkpoint at all, or a class outside the allow-list
            unknown = re.search(r'GLOBAL (\S+) was not an allowed global', str(e))
            if unknown is None or len(stand_ins) == 100:
                raise InputError(f'cannot read checkpoint {path} ({type(e).__name__}): it is corrupt or not a '
                                 f'PyTorch checkpoint; point {flag} at another file') from None
            if unknown.group(1).startswith('torch.nn.'):                 # a module (or DDP) pickled whole
                raise pickled(f'module ({(stand_ins[0][1] if stand_ins else unknown.group(1))})') from None
            stand_ins.append((opaque_class(unknown.group(1).rsplit('.', 1)[-1]), unknown.group(1)))
    if not isinstance(ckpt, dict):                                       # e.g. an object of the user's own class
        raise pickled(f'{type(ckpt).__name__} object')
    return ckpt


def resume_path(args):
    """--resume auto -> <output_dir>/checkpoint-last.pth if present (else None = fresh start)."""
    if args.resume == 'auto':
        path = os.path.join(args.output_dir, 'checkpoint-last.pth')
        return path if os.path.isfile(path) else None
    return args.resume or None


def resume(args, model, optimizer, script):
    """Restore model and optimizer; returns (start_epoch, step, checkpoint or None).

    Loads into the raw model, before torch.compile and DDP wrap it, so checkpoint keys never carry
    '_orig_mod.' or 'module.' prefixes. `script`: the caller's file name; a checkpoint another script
    recorded is refused with the command that continues it.
    """
    path = resume_path(args)
    if path is None:
        return 0, 0, None
    ckpt = load_checkpoint(path, '--resume')
    if not {'model', 'optimizer', 'epoch', 'step'} <= set(ckpt):
        raise InputError(f'{path} is not a training checkpoint of these scripts (no model/optimizer/epoch/step '
                         'entries): evaluate it with probe.py, or start without --resume')
    theirs, ours = ckpt.get('script'), script
    if theirs and theirs != ours:
        raise InputError(f'{path} was written by {theirs}, not {ours}: continue it with `python {theirs} '
                         f'--resume {path} --output_dir {os.path.dirname(path) or "."}` and the flags it was trained '
                         f'with, evaluate it with `python probe.py --checkpoint {path}`, or start {ours} without --resume')
    if ckpt['epoch'] >= args.epochs:
        raise InputError(f'{path} has finished epoch {ckpt["epoch"]} of --epochs {args.epochs}, nothing is left '
                         f'to train: pass --epochs larger than {ckpt["epoch"]} to train on (the cosine schedule '
                         'is then stretched), or evaluate it with probe.py')
    load_matching_state(model, ckpt['model'], path)
    optimizer.load_state_dict(ckpt['optimizer'])
    return ckpt['epoch'], ckpt['step'], ckpt


def run_summary(args, model, num_images, eff_batch, start_epoch, step):
    """The start-up line of a training script: model, data, batch, lr, and where the run starts."""
    return (f'{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {num_images} images '
            f'({describe_decode(args)}), '
            f'effective batch {eff_batch}, lr {args.lr:.3g}, from epoch {start_epoch} (step {step}){warmup_note(args)}')


def warmup_note(args):
    """' (...)' when the warmup outlasts the run, so the printed lr is never reached; else ''."""
    if args.warmup_epochs <= args.epochs:
        return ''
    return (f' (note: --warmup_epochs {args.warmup_epochs} > --epochs {args.epochs}: the lr only reaches '
            f'{args.lr * args.epochs / args.warmup_epochs:.3g}; lower --warmup_epochs to reach {args.lr:.3g})')


def save_training_state(args, model, optimizer, epoch, step, rank, script, **extra):
    """checkpoint-last.pth every epoch; checkpoint-<epoch>.pth every --save_freq and at the end.

    The checkpoint records `script`, the writer's file name (analyze.py rebuilds the model from it,
    resume() checks it). Rank 0 alone writes; every rank gets the path back (error messages name it).
    """
    last = os.path.join(args.output_dir, 'checkpoint-last.pth')
    if rank != 0:
        return last
    state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': epoch,
             'step': step, 'args': vars(args), 'script': script, **extra}
    save_checkpoint(state, last)
    if epoch % args.save_freq == 0 or epoch == args.epochs:
        save_checkpoint(state, os.path.join(args.output_dir, f'checkpoint-{epoch}.pth'))
    return last


# ----------------------------------------------------------------------------------------------
# Logging and command line.

def progress(iterable, rank, **kw):
    """tqdm bar on rank 0 when stderr is a terminal; silent in batch jobs (one line per epoch instead)."""
    return tqdm(iterable, disable=rank != 0 or not sys.stderr.isatty(), leave=False, **kw)


def start_log(args, resumed_epoch=None, extra_logs=()):
    """<output_dir>/log.jsonl (and the script's extra_logs, e.g. MFF's fusion_weights.jsonl, if present)
    hold one run: a fresh run (resumed_epoch None) starts them empty; a resumed run keeps the lines up to
    the epoch it resumed from and appends, so a plot never mixes runs."""
    def before_resume(line):
        try:
            return json.loads(line).get('epoch', 0) <= resumed_epoch
        except ValueError:                                               # a line cut short by a kill
            return False

    for name in ('log.jsonl', *extra_logs):
        path = os.path.join(args.output_dir, name)
        kept = []
        if resumed_epoch is not None and os.path.isfile(path):
            with open(path) as f:
                kept = [line for line in f if before_resume(line)]
        if name == 'log.jsonl' or os.path.isfile(path):
            with open(path, 'w') as f:
                f.writelines(kept)


def make_output_dir(path):
    """Create --output_dir and write a test file there, so a bad path fails before any work, in one line."""
    test = os.path.join(path, f'.write_test{os.getpid()}')
    try:
        os.makedirs(path, exist_ok=True)
        with open(test, 'w'):
            pass
        os.remove(test)
    except OSError as e:
        cause = ('it is an existing file' if os.path.isfile(path) else
                 'a folder on the way is an existing file' if e.errno == errno.ENOTDIR else e.strerror)
        raise InputError(f'cannot write to --output_dir {path} ({cause}): pass a folder you can write to') from None


def log_epoch(args, rank, stats):
    """Rank 0: print one line and append a JSON line to <output_dir>/log.jsonl (see start_log)."""
    if rank != 0:
        return
    shown = ' '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in stats.items())
    print(shown, flush=True)
    with open(os.path.join(args.output_dir, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(stats) + '\n')


def add_common_args(parser):
    """Flags every pre-training script shares, with the official MAE names."""
    a = parser.add_argument
    a('--batch_size', type=int, default=64, help='per-GPU batch; effective = batch_size x accum_iter x GPUs')
    a('--accum_iter', type=int, default=1, help='gradient accumulation steps (raise it when memory is short)')
    a('--epochs', type=int, default=300)
    a('--warmup_epochs', type=int, default=40)
    a('--blr', type=float, default=1.5e-4, help='base lr: lr = blr x effective batch / 256')
    a('--lr', type=float, default=None, help='absolute lr; overrides --blr')
    a('--min_lr', type=float, default=0., help='lr floor of the cosine schedule')
    a('--weight_decay', type=float, default=0.05)
    a('--data_path', default='', help='ImageNet-style root with train/<class>/*; empty = built-in shapes')
    a('--builtin_size', type=int, default=4096, help='number of built-in training images')
    a('--builtin_label', default='shape', choices=['shape', 'count'],
      help='built-in label kind (pre-training ignores labels)')
    a('--output_dir', default='./output', help='checkpoints and log.jsonl go here')
    a('--resume', default='', help="checkpoint path, or 'auto' = <output_dir>/checkpoint-last.pth if any")
    a('--save_freq', type=int, default=20, help='also keep checkpoint-<epoch>.pth every this many epochs')
    a('--num_workers', type=int, default=10, help='loader processes per GPU; JPEG decoding needs many (bench.py --data '
      'prints the cores per GPU each decode path needs; --gpu_decode needs the fewest)')
    a('--seed', type=int, default=0)
    a('--compile', action='store_true', help='torch.compile the model (faster steps after a slow first one)')
    a('--print_freq', type=int, default=50, help='steps between loss syncs (NaN check, progress bar)')
    add_decode_args(parser)


def add_builtin_eval_args(parser):
    """--builtin_val_size / --builtin_seed of the evaluation scripts (probe.py, finetune.py; build_dataset reads them)."""
    a = parser.add_argument
    a('--builtin_val_size', type=int, default=None,
      help='built-in evaluation images (default: a quarter of --builtin_size, at least 256). The top-1 of n images '
           'has a standard error of up to 50/sqrt(n) points: 256 images, about 3 points')
    a('--builtin_seed', type=int, default=None,
      help='draw the built-in images from seed S (train 2S, val 2S+1) instead of --seed (the default), so runs '
           'with different --seed (probe seeds, checkpoints of several pre-training seeds) see the very same '
           'images: paired comparisons')


def add_decode_args(parser):
    """--exact_decode / --gpu_decode (common.ImageView); the default is JPEG draft mode on the CPU."""
    a = parser.add_argument
    a('--exact_decode', action='store_true',
      help='full-size JPEG decode and torchvision crop-then-resize: bit for bit the old pixels, at about 2x the '
           'CPU time of the default (draft mode + crop-box resize, on average < 0.05 pixel levels off at 224 px, '
           '1-2 where the decode is reduced). finetune.py always decodes fully')
    a('--gpu_decode', action='store_true',
      help='workers only read file bytes and draw the crops; the training process decodes the batch on its '
           'device (nvjpeg on CUDA) and crops there: use it when the loader, not the GPU, limits the speed '
           '(too few CPU cores per GPU). Needs JPEG files (--data_path); not for finetune.py')


# Shared flags that are errors when negative or non-finite (if a script has them; None = left to the script).
NON_NEGATIVE = ('lr', 'blr', 'min_lr', 'weight_decay', 'warmup_epochs', 'num_workers', 'builtin_seed')
AT_LEAST_ONE = ('epochs', 'accum_iter', 'save_freq', 'print_freq', 'builtin_val_size')


def check_flags(args):
    """One check of the shared numeric flags, before any work: a bad value is a one-line InputError.
    A script checks its own flags (PiLaMIM's momenta, probe.py's k-NN) where it resolves them."""
    for name in NON_NEGATIVE + AT_LEAST_ONE:
        v = getattr(args, name, None)
        if v is None:
            continue
        if not math.isfinite(v):
            raise InputError(f'--{name} {v} is not a finite number: pass a number such as the default')
        if name in NON_NEGATIVE and v < 0:
            raise InputError(f'--{name} {v} is negative: pass 0 or more')
        if name in AT_LEAST_ONE and v < 1:
            raise InputError(f'--{name} {v} < 1: pass at least 1' + (
                ' (--epochs 0 would train nothing)' if name == 'epochs' else ''))


def parse_args(parser, presets=None, argv=None):
    """Parse flags; `--preset NAME` replaces argparse defaults by presets[NAME], and explicit flags win.

    The one way a script's defaults change: argparse defaults are the reference recipe, a preset
    (e.g. 'laptop') overrides some of them, and whatever a script resolves at start-up it resolves
    in one visible function (resolve_recipe) that prints the outcome.
    """
    args, _ = parser.parse_known_args(argv)
    if presets and getattr(args, 'preset', None):
        parser.set_defaults(**presets[args.preset])
    return parser.parse_args(argv)


def run(main, parser, presets=None):
    """Parse flags (parse_args: presets, then explicit flags) and run main.

    Flags and --output_dir are checked first. InputError / NonFiniteLossError / DiskFullError, and a
    full disk anywhere else (a log or result file), end the program with one line naming the problem
    and the fix, exit code 2.
    """
    args = parse_args(parser, presets)
    finished = False
    try:
        check_flags(args)
        if getattr(args, 'output_dir', None):
            make_output_dir(args.output_dir)
        main(args)
        finished = True
    except Exception as e:
        if isinstance(e, (InputError, NonFiniteLossError, DiskFullError)):
            # A loader worker wraps the message in its traceback; the last line is ours.
            msg = re.sub(r'^[\w.]*Error: ', '', str(e).strip().splitlines()[-1])
        elif disk_full(e):              # a log or result file (checkpoints raise DiskFullError themselves)
            where = getattr(args, 'output_dir', None) or '.'
            msg = (f'disk full while writing in {where}: checkpoints already written are intact; free space '
                   f'there, then rerun the same command (training scripts: with --resume auto)')
        else:
            raise
        print(f'{parser.prog}: error: {msg}', file=sys.stderr, flush=True)
        if dist.is_initialized():       # leave at once: tearing gloo down while a peer still runs aborts
            os._exit(2)                 # the process (SIGABRT), which would hide the exit code
        sys.exit(2)
    finally:
        if finished:
            close_distributed()


def close_distributed():
    """End of a torchrun job: wait for every rank (rank 0 may still be writing), then tear down.

    Without the barrier, gloo aborts a rank that leaves while another still works ("terminate called
    without an active exception"), and torchrun reports a finished run as failed.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Analysis: frequency, attention entropy, Hessian spectrum (used by analyze.py; MFF Figs. 1-2 and
# 4-6, "Beyond [cls]" attention entropy). Method-agnostic: they see tokens, blocks and a loss.

def relative_log_amplitude(tokens):
    """Patch tokens (N, L, C) of one layer, L = h*h -> (h // 2,) float32: the relative log amplitude.

    Park & Kim's recipe (how-do-vits-work): FFT2 over the token grid, log(|F| + 1e-6), roll by h/2
    so the zero frequency sits at the centre, mean over batch and channels, the half diagonal from
    the centre outwards (0 ... (h/2 - 1)/h cycles per token), minus its first (zero-frequency) value.
    The last value measures the layer's high-frequency content relative to its DC component.
    """
    n, L, c = tokens.shape
    h = math.isqrt(L)
    if h * h != L:
        raise InputError(f'{L} patch tokens form no square grid: the frequency analysis needs square images')
    x = tokens.float().transpose(1, 2).reshape(n, c, h, h)               # (N, C, h, h)
    f = (torch.fft.fft2(x).abs() + 1e-6).log()
    f = torch.roll(f, shifts=(h // 2, h // 2), dims=(2, 3)).mean(dim=(0, 1))  # (h, h), DC at the centre
    d = f.diag()[h // 2:]                                                # (h // 2,)
    return d - d[0]


def explicit_attention(attn, x):
    """A timm Attention module on its input x (N, T, D) -> (probabilities (N, H, T, T), output (N, T, D)).

    timm runs F.scaled_dot_product_attention, which never materialises the probabilities; this
    recomputes them from the module's own qkv weights (q_norm / k_norm included), in fp32 even
    under autocast, and the output from them, so a caller can check they are the ones in use.
    """
    n, t, _ = x.shape
    with torch.autocast(x.device.type, enabled=False):
        qkv = attn.qkv(x.float()).reshape(n, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                          # (N, H, T, hd) each
        q, k = attn.q_norm(q), attn.k_norm(k)
        probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (N, H, T, T)
        out = attn.proj(attn.norm((probs @ v).transpose(1, 2).reshape(n, t, -1)))
    return probs, out


def entropy_over_patch_keys(probs):
    """Attention probabilities (..., T) with the cls key first -> entropy (...) in nats over the patch keys.

    "Beyond [cls]" (main_attention_stats.py): drop the cls key, renormalise p = a[1:] / (sum + 1e-6),
    H = -sum p log(p + 1e-6); ln(T - 1) for uniform attention, 0 for attention on one patch.
    """
    p = probs[..., 1:]
    p = p / (p.sum(dim=-1, keepdim=True) + 1e-6)
    return -(p * (p + 1e-6).log()).sum(dim=-1)


@torch.no_grad()
def attention_entropy(encoder, imgs):
    """Per block of a ViTEncoder on unmasked imgs (N, C, H, W) -> (cls, patch): two (depth,) tensors.

    cls: the cls query's entropy; patch: the mean over patch queries; both per head first, then
    averaged over heads and images (not the entropy of averaged attention).
    """
    x = encoder.embed(imgs)                                              # (N, 1 + L, D)
    cls, patch = [], []
    for blk in encoder.blocks:
        probs, _ = explicit_attention(blk.attn, blk.norm1(x))            # (N, H, T, T)
        ent = entropy_over_patch_keys(probs)                             # (N, H, T): per query
        cls.append(ent[:, :, 0].mean())
        patch.append(ent[:, :, 1:].mean())
        x = blk(x)
    return torch.stack(cls), torch.stack(patch)


def hessian_vector_product(grads, params, v):
    """H v for gradients built with create_graph=True: one more backward (Pearlmutter's trick)."""
    return torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)


def _dot(a, b):
    return sum((x * y).sum() for x, y in zip(a, b))


def _normalised(v):
    norm = _dot(v, v).sqrt() + 1e-6                                      # PyHessian's normalisation
    return [x / norm for x in v]


def hessian_top_eigenvalues(loss_fn, params, k=1, max_iter=100, tol=1e-3):
    """Top-k Hessian eigenvalues (largest magnitude first, a list of k floats) of loss_fn() w.r.t. params.

    PyHessian's power iteration (MFF Fig. 5, after Park & Kim): v random, normalised; each step
    v <- Gram-Schmidt(v) against the eigenvectors found, lambda = v.Hv, v <- Hv / (|Hv| + 1e-6);
    stop when |lambda_prev - lambda| / (|lambda_prev| + 1e-6) < tol or after max_iter steps.
    loss_fn: () -> scalar loss, computed in fp32 (no autocast: bf16 noise swamps the curvature).
    """
    params = [p for p in params if p.requires_grad]
    # Double backward is not implemented for the flash / memory-efficient attention kernels that
    # timm's Block picks: the math kernel is the one that can be differentiated twice.
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
        eigenvalues, eigenvectors = [], []
        for _ in range(k):
            v = _normalised([torch.randn_like(p) for p in params])
            eigenvalue = None
            for _ in range(max_iter):
                for w in eigenvectors:                                   # deflation: stay orthogonal
                    v = [x - _dot(v, w) * y for x, y in zip(v, w)]
                v = _normalised(v)
                hv = hessian_vector_product(grads, params, v)
                new = float(_dot(hv, v))
                v = _normalised([x.detach() for x in hv])
                converged = eigenvalue is not None and abs(eigenvalue - new) / (abs(eigenvalue) + 1e-6) < tol
                eigenvalue = new
                if converged:
                    break
            eigenvalues.append(eigenvalue)
            eigenvectors.append(v)
    return eigenvalues
