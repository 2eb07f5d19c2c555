"""PiLaMIM: pixel + latent masked image modeling with a [cls] target (Lee et al., 2025).

A context encoder sees the visible 25% of patches (+ cls); two decoders read its output: a pixel
decoder (MAE's target) and a latent decoder that predicts the features an EMA target encoder
computes from the whole image, [cls] included (I-JEPA-like target):

    L = L_pixel + L_latent + L_cls                                          (Eq. 4-5)
    theta_t <- m theta_t + (1 - m) theta_c,  m: 0.996 -> 1 linearly per step  (EMA)

Paper -> code:
    Eq. 4-5 L = L_pixel + L_latent + L_cls   PiLaMIM.forward (common.masked_mse; latent targets from
                                             PiLaMIM.target_features, the EMA encoder on all patches)
    EMA update and its momentum schedule    PiLaMIM.update_target, momentum_at
    pixel and latent decoders               Decoder
This file needs common.py alone.
Unlike the public code, the targets stay in the original patch order (its target pass shuffles
them), and the target encoder starts as a copy of the context encoder (as the paper says).
Followed from the public code although the paper does not state it: no qkv bias, learned decoder
position embeddings (1, 1 + L, D) added to the cls token too, no norm before the decoder heads,
PyTorch's default init of every Block, the patch conv and the Linear embeds / heads with only the
cls token, mask tokens and decoder positions set (trunc_normal 0.02; `--init mae` for MAE's xavier),
weight decay on every parameter (`--wd_rule all`), the per-epoch schedule (`--lr_schedule epoch`).
Kept from the MAE frame for interoperability: the encoders' fixed sin-cos position table with a
cls row (theirs is learned, (L, 1, D), no cls position) and LayerNorm eps 1e-6 (timm's ViT). The
context encoder keeps the top-level timm names (probe.py loads it); the target encoder is under
`target_encoder.`, the decoders under `pixel_decoder.` and `latent_decoder.`.

    python pilamim.py --preset laptop                             # built-in data, CPU, ~5 minutes
    torchrun --nproc_per_node=8 pilamim.py --epochs 800 --data_path /imagenet
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (WD_RULES, Block, InputError, LayerNorm, LossTracker, ViTEncoder, adamw, add_common_args, autocast,
                    build_dataset, check_mask_ratio, compile_model, encoder_state_dict, init_distributed, init_weights,
                    log_epoch, lr_at, make_loader, make_output_dir, masked_mse, no_sync_unless, pixel_targets,
                    progress, random_masking, remove_stale_temp_files, restore_order, resume, resume_path, run,
                    run_summary, save_training_state, scale_lr, seed_epoch, set_lr, start_log, to_device, train_view,
                    vit_arch, wrap_ddp)

SCRIPT = os.path.basename(__file__)                  # recorded in every checkpoint: analyze.py rebuilds from it


def default_init(module):
    """PyTorch's own init on every layer of `module` (what nn.Module construction does): Linear and Conv2d
    kaiming-uniform with bound 1/sqrt(fan_in), bias likewise; LayerNorm ones / zeros. The public code
    leaves its timm Blocks, patchify conv and heads at this; it undoes ViTEncoder's xavier init."""
    for m in module.modules():
        if m is not module and hasattr(m, 'reset_parameters'):
            m.reset_parameters()


class Decoder(nn.Module):
    """MAE-style decoder with its own input projection, mask token, position embedding and head.

    As in the public code (nothing downstream loads the decoders): a learned position embedding
    (trunc_normal 0.02) for the cls token and the patches, no qkv bias, no norm before the head (the
    blocks are pre-norm, so the last block's residual stream goes straight to decoder_pred), and
    PyTorch's default init of the layers (init='mae': MAE's xavier).
    """

    def __init__(self, in_dim, out_dim, grid, dim=384, depth=6, num_heads=12, mlp_ratio=4., init='public'):
        super().__init__()
        self.decoder_embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))   # cls row first
        self.decoder_blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, qkv_bias=False, norm_layer=LayerNorm)
                                             for _ in range(depth)])
        self.decoder_pred = nn.Linear(dim, out_dim)
        if init == 'mae':
            self.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=.02)

    def forward(self, x, ids_restore):
        """x (N, 1 + K, D) -> (N, 1 + L, out_dim): cls first, patches in the ORIGINAL order."""
        x = restore_order(self.decoder_embed(x), self.mask_token, ids_restore)   # (N, 1 + L, dim)
        x = x + self.decoder_pos_embed                                           # the cls token's too
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(x)


class PiLaMIM(ViTEncoder):
    """Context encoder (this module's own ViT), EMA target encoder, pixel and latent decoders.

    Meets the pre-training contract of common.py: forward -> (loss, pred, mask, loss terms).
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 decoder_embed_dim=384, decoder_depth=6, decoder_num_heads=12, mlp_ratio=4.,
                 norm_pix_loss=False, cls_loss=True, latent_target='raw', init='public'):
        # No qkv bias, as the public code (timm's VisionTransformer(qkv_bias=False) and probe.py load it).
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias=False)
        if latent_target not in ('raw', 'layernorm'):
            raise InputError(f"--latent_target '{latent_target}' unknown: use raw or layernorm")
        if init not in ('public', 'mae'):
            raise InputError(f"--init '{init}' unknown: use public (the public code's) or mae (MAE's xavier)")
        if init == 'public':                                             # before the copy below
            default_init(self)                                           # the sin-cos table is no layer: kept
            nn.init.trunc_normal_(self.cls_token, std=.02)
        self.norm_pix_loss, self.cls_loss, self.latent_target = norm_pix_loss, cls_loss, latent_target
        # Target encoder: same shape, initialised as a copy, never trained by gradients.
        self.target_encoder = ViTEncoder(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio,
                                         qkv_bias=False)
        self.target_encoder.load_state_dict(encoder_state_dict(self.state_dict()))
        self.target_encoder.requires_grad_(False)
        grid = img_size // patch_size
        dec = dict(grid=grid, dim=decoder_embed_dim, depth=decoder_depth, num_heads=decoder_num_heads, init=init)
        self.pixel_decoder = Decoder(embed_dim, patch_size ** 2 * in_chans, **dec)
        self.latent_decoder = Decoder(embed_dim, embed_dim, **dec)

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

    def reconstruction_target(self, imgs):
        """The image the pixel decoder reconstructs: the input itself."""
        return imgs

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        """imgs (N, C, H, W) normalised -> (loss, pixel pred (N, L, p*p*C), mask (N, L), (L_pixel, L_latent, L_cls))."""
        ids_keep, mask, ids_restore = random_masking(imgs.shape[0], self.num_patches, mask_ratio,
                                                     imgs.device, noise)
        latent = self.forward_features(imgs, ids_keep)                   # (N, 1 + K, D), after the final norm
        pred_pix = self.pixel_decoder(latent, ids_restore)[:, 1:]       # (N, L, p*p*C)
        pred_lat = self.latent_decoder(latent, ids_restore)             # (N, 1 + L, D)
        # L_pixel: MAE loss on masked patches (optionally norm_pix).
        target_pix = pixel_targets(self.reconstruction_target(imgs), self.patch_size, self.norm_pix_loss)
        l_pix = masked_mse(pred_pix, target_pix, mask)
        # L_latent and L_cls: prediction i is paired with the target of patch i (both original order).
        target_lat = self.target_features(imgs)                          # (N, 1 + L, D), no grad
        l_lat = masked_mse(pred_lat[:, 1:], target_lat[:, 1:], mask)
        l_cls = (F.mse_loss(pred_lat[:, 0].float(), target_lat[:, 0]) if self.cls_loss
                 else torch.zeros((), device=imgs.device))
        return l_pix + l_lat + l_cls, pred_pix, mask, (l_pix, l_lat, l_cls)


def build_model(args):
    """PiLaMIM from the command line: --model (ViT size and patch), --depth, decoder and latent-branch flags."""
    return PiLaMIM(img_size=args.input_size, **vit_arch(args.model, args.depth),
                   decoder_embed_dim=args.decoder_embed_dim, decoder_depth=args.decoder_depth,
                   decoder_num_heads=args.decoder_num_heads, norm_pix_loss=args.norm_pix_loss,
                   cls_loss=not args.no_cls_loss, latent_target=args.latent_target, init=args.init)


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


def train_one_epoch(model, raw_model, loader, optimizer, device, epoch, step, tracker, args):
    """One pass; EMA update (on raw_model, under any DDP/compile wrapper) after every optimizer step.
    Returns (step, {loss parts}, images/s). tracker: the run's LossTracker (rank, world size, checkpoint)."""
    model.train()
    tracker.start()
    micro_steps = len(loader) // args.accum_iter * args.accum_iter
    total_steps = args.epochs * (len(loader) // args.accum_iter)        # momentum schedule length
    bar = progress(loader, tracker.rank, total=micro_steps, desc=f'epoch {epoch}')
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
                loss, _, _, terms = model(imgs, args.mask_ratio)
            (loss / args.accum_iter).backward()
        if last_micro:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            raw_model.update_target(momentum_at(step, total_steps, args.ema_momentum, args.ema_end))
            step += 1
        tracker.add(step, loss, *terms)
        if (i + 1) % args.print_freq == 0:
            tracker.check()
            bar.set_postfix(loss=f"{tracker.mean(1)['loss']:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    tracker.check()
    return step, tracker.mean(), micro_steps * args.batch_size * tracker.world_size / (time.time() - start)


def resolve_recipe(args):
    """The start-up checks, in one place (the defaults are the public code's recipe). -> the recipe line."""
    for name in ('ema_momentum', 'ema_end'):
        v = getattr(args, name)
        if not 0 <= v <= 1:                                              # NaN fails this too
            raise InputError(f'--{name} {v} is outside [0, 1]: EMA momentum is a fraction (0.996 -> 1 in the paper)')
    return (f'PiLaMIM as the public code: {args.lr_schedule} lr schedule, crop {args.crop}, weight decay '
            f'{args.weight_decay} on the {args.wd_rule} groups (common.param_groups), norm_pix '
            f'{"on" if args.norm_pix_loss else "off"}, cls loss {"off" if args.no_cls_loss else "on"}, '
            f'latent target {args.latent_target}, EMA {args.ema_momentum} -> {args.ema_end}, {args.init} init')


def main(args):
    """Set-up in order (data -> model -> optimizer -> resume -> compile/DDP), then the epochs, each
    ending in a checkpoint and a log line."""
    rank, world_size, device = init_distributed()
    make_output_dir(args.output_dir)
    recipe = resolve_recipe(args)
    dataset = build_dataset(args, 'train', train_view(args, args.crop))
    loader, sampler = make_loader(dataset, args.batch_size, rank, world_size, args.num_workers, seed=args.seed,
                                  accum_iter=args.accum_iter)
    torch.manual_seed(args.seed)                                         # same init on every rank
    raw_model = build_model(args).to(device)                             # target encoder: no grad, not optimised
    check_mask_ratio(args.mask_ratio, raw_model.num_patches)
    eff_batch = scale_lr(args, world_size)                               # lr = blr x effective batch / 256
    optimizer = adamw(raw_model, args, device)                           # the --wd_rule groups
    start_epoch, step, resumed = resume(args, raw_model, optimizer, SCRIPT)   # target encoder and step too
    model = wrap_ddp(compile_model(raw_model) if args.compile else raw_model, device, world_size)
    if rank == 0:
        remove_stale_temp_files(args.output_dir)                         # left by a kill mid-write
        start_log(args, start_epoch if resumed else None)
        print(f'{run_summary(args, raw_model, len(dataset), eff_batch, start_epoch, step)}\nrecipe: {recipe}',
              flush=True)
    tracker = LossTracker(device, rank, world_size, NAMES, checkpoint=resume_path(args))
    total_steps = args.epochs * (len(loader) // args.accum_iter)
    for epoch in range(start_epoch, args.epochs):
        seed_epoch(args.seed, epoch, rank)                               # RNGs and data order from (seed, epoch)
        sampler.set_epoch(epoch)
        step, losses, speed = train_one_epoch(model, raw_model, loader, optimizer, device, epoch, step, tracker, args)
        tracker.checkpoint = save_training_state(args, raw_model, optimizer, epoch + 1, step, rank, SCRIPT)
        log_epoch(args, rank, {'epoch': epoch + 1, 'step': step, **losses, 'lr': optimizer.param_groups[0]['lr'],
                               'ema_momentum': momentum_at(step, total_steps, args.ema_momentum, args.ema_end),
                               'images_per_s': round(speed, 1)})
    return raw_model


def get_args_parser():
    """Argparse defaults = the public code's recipe (ViT-B/16, 800 epochs); --preset overrides some of them."""
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    a = p.add_argument
    a('--preset', choices=sorted(PRESETS), help='laptop: ViT-tiny/4, 32 px, built-in data, ~5 min on 2 CPU cores')
    a('--model', default='pilamim_vit_base_patch16',
      help='<name>_vit_<size>_patch<p>: ViT size (tiny, small, base, large, huge) and patch of both encoders')
    a('--input_size', type=int, default=224)
    a('--depth', type=int, default=None, help="encoder blocks; overrides the model size's depth (small studies)")
    a('--mask_ratio', type=float, default=0.75, help='fraction of patches removed')
    a('--norm_pix_loss', action=argparse.BooleanOptionalAction, default=False,
      help='standardise each pixel-target patch (off: raw pixels, as the paper)')
    a('--decoder_embed_dim', type=int, default=384)
    a('--decoder_depth', type=int, default=6)
    a('--decoder_num_heads', type=int, default=12)
    a('--no_cls_loss', action='store_true', help="drop L_cls (the paper's 'w/o [CLS]' ablation)")
    a('--latent_target', default='raw', choices=['raw', 'layernorm'],
      help="raw: target encoder output after its final norm (paper); layernorm: + non-affine LN (I-JEPA)")
    a('--ema_momentum', type=float, default=0.996, help='EMA momentum at the first step')
    a('--ema_end', type=float, default=1.0, help='EMA momentum at the last step (linear per iteration)')
    a('--lr_schedule', default='epoch', choices=['epoch', 'iter'],
      help="epoch: the public code's per-epoch min((e+1)/warmup, cosine over all epochs); iter: MAE's "
           "per-iteration warmup then cosine (common.lr_at)")
    a('--crop', default='rrc', choices=['rrc', 'simple'],
      help="rrc: RandomResizedCrop(0.2, 1), bicubic (the public code); simple: PixMIM's resize + padded crop")
    a('--init', default='public', choices=['public', 'mae'],
      help="public: the public code's PyTorch-default layers, trunc_normal 0.02 tokens and positions; mae: "
           "MAE's xavier layers (as mae_mff.py), to tell an init effect from a method effect against MAE")
    a('--wd_rule', default='all', choices=WD_RULES,
      help='weight-decay groups (common.param_groups); all = every parameter, as the public code')
    add_common_args(p)
    # Public-code recipe: 128 per GPU x 2 accumulation x 8 GPUs = 2048.
    p.set_defaults(batch_size=128, accum_iter=2, epochs=800)
    return p


PRESETS = {'laptop': dict(model='pilamim_vit_tiny_patch4', input_size=32, decoder_embed_dim=128, decoder_depth=2,
                          decoder_num_heads=4, batch_size=128, accum_iter=1, epochs=5, warmup_epochs=1, blr=1.5e-3,
                          builtin_size=4096, num_workers=1, save_freq=4, output_dir='./output/pilamim_laptop',
                          print_freq=8,
                          lr_schedule='iter')}  # 1 warm-up epoch: per-epoch steps would skip the warm-up

if __name__ == '__main__':
    run(main, get_args_parser(), PRESETS)
