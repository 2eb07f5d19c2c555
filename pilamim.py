"""PiLaMIM: pixel + latent masked image modeling with a [cls] target (Lee et al., 2025).

A context encoder sees the visible 25% of patches (+ cls); two decoders read its output: a pixel
decoder (MAE's target) and a latent decoder that predicts the features an EMA target encoder
computes from the whole image, [cls] included (I-JEPA-like target):

    L = L_pixel + L_latent + L_cls                                          (Eq. 4-5)
    theta_t <- m theta_t + (1 - m) theta_c,  m: 0.996 -> 1 linearly per step  (EMA)

Unlike the public code, the targets stay in the original patch order (its target pass shuffles
them), and the target encoder starts as a copy of the context encoder (as the paper says).
Followed from the public code although the paper does not state it: no qkv bias, learned decoder
position embeddings without a cls position, no norm before the decoder heads, weight decay on
every parameter (`--wd_rule all`), the per-epoch schedule (`--lr_schedule epoch`). Kept from the
MAE frame for interoperability: the encoders' fixed sin-cos position table with a cls row and
LayerNorm eps 1e-6 (timm's ViT; the README says why).
The context encoder keeps the top-level timm names (probe.py loads it); the target encoder is
under `target_encoder.`, the decoders under `pixel_decoder.` and `latent_decoder.`.

    python pilamim.py --preset laptop                             # built-in data, CPU, ~5 minutes
    torchrun --nproc_per_node=8 pilamim.py --epochs 800 --data_path /imagenet
"""
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (Block, InputError, LayerNorm, LossTracker, VIT_SIZES, ViTEncoder, autocast, build_dataset,
                    encoder_state_dict, epochs, init_distributed, init_weights, log_epoch, log_fusion_weights, lr_at,
                    masked_mse, no_sync_unless, pixel_targets, prepare_training, progress, random_masking,
                    restore_order, resume_path, run, save_training_state, set_lr, to_device, train_view, use_recipe)
from mae_mff import MODELS, MultiLevelFusion, encoder_depth, parse_mff_layers
from mae_mff import get_args_parser as mae_args_parser


class Decoder(nn.Module):
    """MAE-style decoder with its own input projection, mask token, position embedding and head.

    As in the public code (nothing downstream loads the decoders): a learned position embedding
    (trunc_normal 0.02) with no cls position, no qkv bias, and no norm before the head (the blocks
    are pre-norm, so the last block's residual stream goes straight to decoder_pred).
    """

    def __init__(self, in_dim, out_dim, grid, dim=384, depth=6, num_heads=12, mlp_ratio=4.):
        super().__init__()
        self.decoder_embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim))   # patches only
        self.decoder_blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, qkv_bias=False, norm_layer=LayerNorm)
                                             for _ in range(depth)])
        self.decoder_pred = nn.Linear(dim, out_dim)
        self.apply(init_weights)
        nn.init.normal_(self.mask_token, std=.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=.02)

    def forward(self, x, ids_restore):
        """x (N, 1 + K, D) -> (N, 1 + L, out_dim): cls first, patches in the ORIGINAL order."""
        x = restore_order(self.decoder_embed(x), self.mask_token, ids_restore)   # (N, 1 + L, dim)
        x = torch.cat([x[:, :1], x[:, 1:] + self.decoder_pos_embed], dim=1)      # cls gets no position
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(x)


class PiLaMIM(ViTEncoder):
    """Context encoder (this module's own ViT), EMA target encoder, pixel and latent decoders."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 decoder_embed_dim=384, decoder_depth=6, decoder_num_heads=12, mlp_ratio=4.,
                 norm_pix_loss=False, cls_loss=True, latent_target='raw', mff_layers=(), mff_proj='linear',
                 mff_fusion='weighted', mff_detach=False):
        # No qkv bias, as the public code (timm's VisionTransformer(qkv_bias=False) and probe.py load it).
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias=False)
        if latent_target not in ('raw', 'layernorm'):
            raise InputError(f"--latent_target '{latent_target}' unknown: use raw or layernorm")
        self.norm_pix_loss, self.cls_loss, self.latent_target = norm_pix_loss, cls_loss, latent_target
        # Target encoder: same shape, initialised as a copy, never trained by gradients.
        self.target_encoder = ViTEncoder(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio,
                                         qkv_bias=False)
        self.target_encoder.load_state_dict(encoder_state_dict(self.state_dict()))
        self.target_encoder.requires_grad_(False)
        self.mff = (MultiLevelFusion(embed_dim, mff_layers, depth, num_heads, mff_proj, mff_fusion, mff_detach)
                    if len(mff_layers) else None)                        # MFF for the pixel path only
        self.mff_layers = self.mff.layers if self.mff is not None else []
        grid = img_size // patch_size
        dec = dict(grid=grid, dim=decoder_embed_dim, depth=decoder_depth, num_heads=decoder_num_heads)
        self.pixel_decoder = Decoder(embed_dim, patch_size ** 2 * in_chans, **dec)
        self.latent_decoder = Decoder(embed_dim, embed_dim, **dec)

    def fusion_weights(self):
        return self.mff.logged_weights() if self.mff is not None else None

    @torch.no_grad()
    def target_features(self, imgs):
        """Target encoder on ALL patches, no masking, no shuffle: (N, 1 + L, D), original order."""
        t = self.target_encoder.forward_features(imgs).float()          # after its final norm
        return F.layer_norm(t, t.shape[-1:]) if self.latent_target == 'layernorm' else t  # I-JEPA style

    @torch.no_grad()
    def update_target(self, momentum):
        """EMA: theta_t <- m theta_t + (1 - m) theta_c over all encoder parameters."""
        names = [n for n, _ in self.target_encoder.named_parameters()]
        tgt = [p for _, p in self.target_encoder.named_parameters()]
        ctx = [self.get_parameter(n).detach() for n in names]
        torch._foreach_lerp_(tgt, ctx, 1. - momentum)

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        """-> (loss, L_pixel, L_latent, L_cls). imgs (N, C, H, W) normalised."""
        ids_keep, mask, ids_restore = random_masking(imgs.shape[0], self.num_patches, mask_ratio,
                                                     imgs.device, noise)
        levels = self.forward_blocks(self.embed(imgs, ids_keep), self.mff_layers or [self.depth - 1])
        latent = self.norm(levels[-1])                                   # (N, 1 + K, D)
        pixel_in = self.norm(self.mff(levels)) if self.mff is not None else latent
        pred_pix = self.pixel_decoder(pixel_in, ids_restore)[:, 1:]     # (N, L, p*p*C)
        pred_lat = self.latent_decoder(latent, ids_restore)             # (N, 1 + L, D)
        # L_pixel: MAE loss on masked patches (optionally norm_pix).
        l_pix = masked_mse(pred_pix, pixel_targets(imgs, self.patch_size, self.norm_pix_loss), mask)
        # L_latent and L_cls: prediction i is paired with the target of patch i (both original order).
        target_lat = self.target_features(imgs)                          # (N, 1 + L, D), no grad
        l_lat = masked_mse(pred_lat[:, 1:], target_lat[:, 1:], mask)
        l_cls = (F.mse_loss(pred_lat[:, 0].float(), target_lat[:, 0]) if self.cls_loss
                 else torch.zeros((), device=imgs.device))
        return l_pix + l_lat + l_cls, l_pix, l_lat, l_cls


def build_model(args):
    if args.model not in MODELS:
        raise InputError(f"unknown --model '{args.model}': choose one of {', '.join(MODELS)}")
    size, patch = MODELS[args.model]
    depth = encoder_depth(args, size)
    return PiLaMIM(img_size=args.input_size, patch_size=args.patch_size or patch, **{**VIT_SIZES[size], 'depth': depth},
                   decoder_embed_dim=args.decoder_embed_dim, decoder_depth=args.decoder_depth,
                   decoder_num_heads=args.decoder_num_heads, norm_pix_loss=args.norm_pix_loss,
                   cls_loss=not args.no_cls_loss, latent_target=args.latent_target,
                   mff_layers=parse_mff_layers(args.mff_layers, depth),
                   mff_proj=args.mff_proj, mff_fusion=args.mff_fusion, mff_detach=args.mff_detach)


def epoch_lr(epoch, args):
    """The public code's LambdaLR, stepped once per epoch e: lr x min((e + 1) / warmup, (1 + cos(pi e / epochs)) / 2).

    The cosine runs over the whole run, not from the end of the warm-up as in common.lr_at.
    """
    e = math.floor(epoch)
    warm = (e + 1) / args.warmup_epochs if args.warmup_epochs else 1.
    return args.min_lr + (args.lr - args.min_lr) * min(warm, 0.5 * (1. + math.cos(math.pi * e / args.epochs)))


def momentum_at(step, total_steps, start=0.996, end=1.0):
    """EMA momentum for the update after optimizer step `step` (0-based): linear start -> end."""
    return start + (end - start) * min(step / max(total_steps, 1), 1.)


# ----------------------------------------------------------------------------------------------
# Training loop

NAMES = ('loss', 'pixel', 'latent', 'cls')


def train_one_epoch(model, raw_model, loader, optimizer, device, epoch, step, total_steps, args, rank,
                    world_size, last_ckpt):
    """One pass; EMA update after every optimizer step. Returns (step, {loss parts}, images/s)."""
    model.train()
    tracker = LossTracker(device, NAMES)
    micro_steps = len(loader) // args.accum_iter * args.accum_iter
    bar = progress(loader, rank, total=micro_steps, desc=f'epoch {epoch}')
    schedule = epoch_lr if args.lr_schedule == 'epoch' else lr_at
    start = time.time()
    for i, (imgs, _) in enumerate(bar):
        if i == micro_steps:
            break
        if i % args.accum_iter == 0:
            set_lr(optimizer, schedule(epoch + i / micro_steps, args))
        imgs = to_device(imgs, device)
        last_micro = (i + 1) % args.accum_iter == 0
        with no_sync_unless(model, last_micro):
            with autocast(device):                                       # bf16 on CUDA, target pass too
                losses = model(imgs, args.mask_ratio)
            (losses[0] / args.accum_iter).backward()
        if last_micro:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            raw_model.update_target(momentum_at(step, total_steps, args.ema_momentum, args.ema_end))
            step += 1
        tracker.add(step, *losses)
        if (i + 1) % args.print_freq == 0:
            tracker.check(last_ckpt)
            log_fusion_weights(args, rank, raw_model, epoch + (i + 1) / micro_steps, step)
            bar.set_postfix(loss=f"{tracker.mean(1)['loss']:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    tracker.check(last_ckpt)
    return step, tracker.mean(world_size), micro_steps * args.batch_size * world_size / (time.time() - start)


def resolve_recipe(args):
    """'auto' flags -> the public PiLaMIM code: RandomResizedCrop(0.2, 1), weight decay on every parameter."""
    use_recipe(args, crop='rrc', wd_rule='all')
    return f'PiLaMIM as the public code, {args.lr_schedule} lr schedule'


def main(args):
    rank, world_size, device = init_distributed()
    reference = resolve_recipe(args)
    torch.manual_seed(args.seed)
    raw_model = build_model(args).to(device)                             # target encoder: no grad, not optimised
    dataset = build_dataset(args, 'train', train_view(args, args.crop))
    model, loader, sampler, optimizer, start_epoch, step = prepare_training(   # restores target encoder + step
        args, raw_model, dataset, rank, world_size, device, f'{reference}, target encoder included, cls loss '
        f'{"on" if raw_model.cls_loss else "off"}, latent target {args.latent_target}, '
        f'mff_layers {raw_model.mff_layers or "off"}')
    total_steps = args.epochs * (len(loader) // args.accum_iter)         # momentum schedule length
    last_ckpt = resume_path(args)                                        # named if the loss goes bad
    for epoch in epochs(args, sampler, rank, start_epoch):
        step, losses, speed = train_one_epoch(model, raw_model, loader, optimizer, device, epoch, step,
                                              total_steps, args, rank, world_size, last_ckpt)
        last_ckpt = save_training_state(args, raw_model, optimizer, epoch + 1, step, rank)  # rank 0 writes
        log_epoch(args, rank, {'epoch': epoch + 1, 'step': step, **losses,
                               'lr': optimizer.param_groups[0]['lr'],
                               'ema_momentum': momentum_at(step, total_steps, args.ema_momentum, args.ema_end),
                               'images_per_s': round(speed, 1), 'fusion_weights': raw_model.fusion_weights()})
    return raw_model


def get_args_parser():
    """mae_mff.py's flags with PiLaMIM's defaults, plus the latent-branch switches."""
    p = mae_args_parser(__doc__.split('\n')[0])
    a = p.add_argument
    a('--no_cls_loss', action='store_true', help="drop L_cls (the paper's 'w/o [CLS]' ablation)")
    a('--latent_target', default='raw', choices=['raw', 'layernorm'],
      help="raw: target encoder output after its final norm (paper); layernorm: + non-affine LN (I-JEPA)")
    a('--ema_momentum', type=float, default=0.996, help='EMA momentum at the first step')
    a('--ema_end', type=float, default=1.0, help='EMA momentum at the last step (linear per iteration)')
    a('--lr_schedule', default='epoch', choices=['epoch', 'iter'],
      help="epoch: the public code's per-epoch min((e+1)/warmup, cosine over all epochs); iter: MAE's "
           "per-iteration warmup then cosine (common.lr_at)")
    # Paper recipe: 128 per GPU x 2 accumulation x 8 GPUs = 2048; raw pixels; no MFF; --crop/--wd_rule
    # auto = resolve_recipe (RandomResizedCrop, decay on every parameter).
    p.set_defaults(decoder_embed_dim=384, decoder_depth=6, decoder_num_heads=12, norm_pix_loss=False,
                   mff_layers='none', batch_size=128, accum_iter=2, epochs=800)
    return p


PRESETS = {'laptop': dict(model='mae_vit_tiny_patch16', input_size=32, patch_size=4, decoder_embed_dim=128,
                          decoder_depth=2, decoder_num_heads=4, batch_size=128, accum_iter=1, epochs=5,
                          warmup_epochs=1, blr=1.5e-3, builtin_size=4096, num_workers=1, save_freq=4,
                          output_dir='./output/pilamim_laptop', print_freq=8,
                          lr_schedule='iter')}  # 1 warm-up epoch: per-epoch steps would skip the warm-up

if __name__ == '__main__':
    run(main, get_args_parser(), PRESETS)
