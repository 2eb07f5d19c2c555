"""PixMIM with multi-level feature fusion (PixMIM: Liu et al., TMLR 2024; MFF: Liu et al., ICCV 2023).

PixMIM changes exactly two things in MAE; everything else, the MFF encoder included, is
mae_mff.py's MaskedAutoencoder, which the PixMIM model below extends by its target alone:

  1. the reconstruction target is the low-frequency part of the image: an ideal circular low-pass
     filter in the 2-D Fourier domain (radius 40 px at 224 px), `PixMIM.reconstruction_target`;
  2. the simple resized crop (bilinear resize + padded random crop + flip) replaces RandomResizedCrop
     (`--crop simple`, the default here).

Paper -> code:
    Sec. 3.2 low-frequency target   ideal_low_pass, low_freq_target, PixMIM.reconstruction_target
    Eq. 1 loss on that target       mae_mff.MaskedAutoencoder.forward_loss (common.masked_mse, pixel_targets)
    simple resized crop             common.train_transform(crop='simple')
norm_pix_loss stays on (applied to the filtered target). MFF is on by default with mae_mff.py's
switches; `--mff_layers none` gives plain PixMIM. Departures from the reference code: none in the
target (its missing ifftshift changes nothing, tested); the loop is mae_mff.py's (bf16, per-epoch seeds).

    python pixmim_mff.py --preset laptop                          # built-in data, CPU, ~2 minutes
    torchrun --nproc_per_node=8 pixmim_mff.py --epochs 800 --data_path /imagenet
"""
import argparse
import math
import os

import torch

from common import (IMAGENET_MEAN, IMAGENET_STD, WD_RULES, InputError, LossTracker, adamw, add_common_args,
                    build_dataset, check_mask_ratio, compile_model, init_distributed, log_epoch, make_loader,
                    make_output_dir, remove_stale_temp_files, resume, resume_path, run, run_summary,
                    save_training_state, scale_lr, seed_epoch, start_log, train_view, vit_arch, wrap_ddp)
from mae_mff import FUSION_LOG, MaskedAutoencoder, parse_mff_layers, train_one_epoch

SCRIPT = os.path.basename(__file__)                  # recorded in every checkpoint: analyze.py rebuilds from it


# ----------------------------------------------------------------------------------------------
# Change 1: the low-frequency target (PixMIM Sec. 3.2).

def ideal_low_pass(x, radius):
    """x (N, C, H, W) real -> |IFFT(ifftshift(M * fftshift(FFT(x))))|, same shape, float32.

    M is the ideal circular mask (i - (H-1)/2)^2 + (j - (W-1)/2)^2 <= r^2 on the shifted spectrum.
    The reference code skips the ifftshift; a circular shift of the spectrum only multiplies the
    inverse FFT by a unit-modulus phase factor, which the absolute value removes, so both give the
    same target (tested). A separate matter: the mask centre ((H-1)/2, (W-1)/2) is half a pixel off
    the zero frequency (at (H/2, W/2) after fftshift) for even sizes; we keep the reference's centre.
    """
    H, W = x.shape[-2:]
    spec = torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))  # (N, C, H, W) complex, DC at centre
    i = torch.arange(H, device=x.device, dtype=torch.float32) - (H - 1) / 2
    j = torch.arange(W, device=x.device, dtype=torch.float32) - (W - 1) / 2
    keep = (i[:, None] ** 2 + j[None, :] ** 2 <= radius ** 2)           # (H, W) bool
    spec = torch.fft.ifftshift(spec * keep, dim=(-2, -1))
    return torch.fft.ifft2(spec).abs()                                    # (N, C, H, W)


def smallest_radius(size):
    """Distance of the DC bin (index size // 2 after fftshift) from the mask centre (size-1)/2 on both
    axes: 0.71 px for even sizes, 0 for odd. A smaller radius keeps nothing."""
    return math.hypot(size // 2 - (size - 1) / 2, size // 2 - (size - 1) / 2)


@torch.no_grad()
def low_freq_target(imgs, radius):
    """Normalised batch (N, 3, H, W) -> its low-pass version in the same normalised space.

    Un-normalise to [0, 1] with the ImageNet mean/std, filter per channel, re-normalise: the loss
    (and norm_pix) then sees the target in the space the input lives in. Batched, on imgs' device.
    """
    mean = torch.tensor(IMAGENET_MEAN, device=imgs.device).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=imgs.device).view(1, -1, 1, 1)
    return (ideal_low_pass(imgs.float() * std + mean, radius) - mean) / std


class PixMIM(MaskedAutoencoder):
    """MAE / MFF-MAE whose reconstruction target is the low-pass image; same weights and state-dict keys."""

    def __init__(self, lpf_radius=40., **mae_kwargs):
        super().__init__(**mae_kwargs)
        self.lpf_radius = lpf_radius

    def reconstruction_target(self, imgs):
        with torch.autocast(imgs.device.type, enabled=False):           # the FFT filter in fp32
            return low_freq_target(imgs, self.lpf_radius)                # no grad


def build_model(args):
    """PixMIM from the command line (args.lpf_radius resolved by resolve_recipe)."""
    arch = vit_arch(args.model, args.depth)
    return PixMIM(
        lpf_radius=args.lpf_radius, img_size=args.input_size, **arch, decoder_embed_dim=args.decoder_embed_dim,
        decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_num_heads, norm_pix_loss=args.norm_pix_loss,
        mff_layers=parse_mff_layers(args.mff_layers, arch['depth']), mff_proj=args.mff_proj,
        mff_fusion=args.mff_fusion, mff_detach=args.mff_detach)


# ----------------------------------------------------------------------------------------------
# Training: mae_mff.py's loop (the target lives in the model); change 2 is the --crop simple default.

def resolve_recipe(args):
    """The start-up resolution, in one place: --lpf_radius (default 40 px x input_size / 224, ~5.7 at 32),
    refused if it keeps no frequency. -> the recipe line main prints."""
    if args.lpf_radius is None:
        args.lpf_radius = 40. * args.input_size / 224
    if args.lpf_radius < smallest_radius(args.input_size) or args.lpf_radius <= 0:
        smallest = math.ceil(smallest_radius(args.input_size) * 1e4) / 1e4  # rounded up: it keeps DC
        raise InputError(f'--lpf_radius {args.lpf_radius} keeps no frequency, not even the mean (DC), so the target '
                         f'is all zeros: use {f"at least {smallest:g}" if smallest else "more than 0"} at '
                         f'{args.input_size} px (the paper\'s 40 x input_size / 224 is {40 * args.input_size / 224:.3g})')
    name = 'PixMIM as mmselfsup' if args.mff_layers == 'none' else 'MFF-PixMIM as mmpretrain'
    return (f'{name}: low-pass radius {args.lpf_radius:.3g} px, crop {args.crop}, weight decay {args.weight_decay} on '
            f'the {args.wd_rule} groups (common.param_groups), norm_pix {"on" if args.norm_pix_loss else "off"}, '
            f'mff_layers {args.mff_layers}')


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
    raw_model = build_model(args).to(device)
    check_mask_ratio(args.mask_ratio, raw_model.num_patches)
    eff_batch = scale_lr(args, world_size)                               # lr = blr x effective batch / 256
    optimizer = adamw(raw_model, args, device)                           # the --wd_rule groups
    start_epoch, step, resumed = resume(args, raw_model, optimizer, SCRIPT)   # before compile/DDP wrap it
    model = wrap_ddp(compile_model(raw_model) if args.compile else raw_model, device, world_size)
    if rank == 0:
        remove_stale_temp_files(args.output_dir)                         # left by a kill mid-write
        start_log(args, start_epoch if resumed else None, extra_logs=[FUSION_LOG])
        print(f'{run_summary(args, raw_model, len(dataset), eff_batch, start_epoch, step)}\nrecipe: {recipe}',
              flush=True)
    tracker = LossTracker(device, rank, world_size, checkpoint=resume_path(args))
    for epoch in range(start_epoch, args.epochs):
        seed_epoch(args.seed, epoch, rank)                               # RNGs and data order from (seed, epoch)
        sampler.set_epoch(epoch)
        step, loss, speed = train_one_epoch(model, loader, optimizer, device, epoch, step, tracker, args)
        tracker.checkpoint = save_training_state(args, raw_model, optimizer, epoch + 1, step, rank, SCRIPT)
        log_epoch(args, rank, {'epoch': epoch + 1, 'step': step, 'loss': loss,
                               'lr': optimizer.param_groups[0]['lr'], 'images_per_s': round(speed, 1),
                               'fusion_weights': raw_model.fusion_weights()})
    return raw_model


def get_args_parser():
    """Argparse defaults = the reference recipe (MFF-PixMIM, ViT-B/16); --preset overrides some of them."""
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    a = p.add_argument
    a('--preset', choices=sorted(PRESETS), help='laptop: ViT-tiny/4, 32 px, built-in data, ~2 min on 2 CPU cores')
    a('--model', default='mae_vit_base_patch16',
      help='<name>_vit_<size>_patch<p>: ViT size (tiny, small, base, large, huge) and patch, with the MAE decoder')
    a('--input_size', type=int, default=224)
    a('--depth', type=int, default=None, help="encoder blocks; overrides the model size's depth (small studies)")
    a('--mask_ratio', type=float, default=0.75, help='fraction of patches removed')
    a('--norm_pix_loss', action=argparse.BooleanOptionalAction, default=True,
      help='standardise each (low-pass) target patch, as PixMIM does')
    a('--lpf_radius', type=float, default=None, help='low-pass radius in pixels (default 40 x input_size / 224)')
    a('--decoder_embed_dim', type=int, default=512)
    a('--decoder_depth', type=int, default=8)
    a('--decoder_num_heads', type=int, default=16)
    a('--mff_layers', default='paper',
      help="blocks to fuse: 'paper' ([0,2,4,6,8,11] at depth 12), 'none' (plain PixMIM) or e.g. '0,11'")
    a('--mff_proj', default='linear', choices=['linear', 'mlp', 'none'], help='projection of shallow levels')
    a('--mff_fusion', default='weighted', choices=['weighted', 'attn'], help='Eq. 4 (weighted) or Eq. 5 (attn)')
    a('--mff_detach', action='store_true', help='no gradient into shallow blocks through the fusion (A.8)')
    a('--crop', default='simple', choices=['rrc', 'simple'],
      help="simple: PixMIM's bilinear resize + padded random crop (its reference); rrc: MAE's RandomResizedCrop")
    a('--wd_rule', default='mmpretrain', choices=WD_RULES,
      help='weight-decay groups (common.param_groups); mmpretrain = the reference of PixMIM and MFF-PixMIM')
    add_common_args(p)
    # Paper recipe: 128 per GPU x 4 accumulation x 8 GPUs = 4096 images per step.
    p.set_defaults(batch_size=128, accum_iter=4)
    return p


PRESETS = {
    'laptop': dict(model='mae_vit_tiny_patch4', input_size=32, decoder_embed_dim=128, decoder_depth=2,
                   decoder_num_heads=4, batch_size=128, accum_iter=1, epochs=5, warmup_epochs=1, blr=1.5e-3,
                   builtin_size=4096, num_workers=1, save_freq=4, output_dir='./output/pixmim_mff_laptop',
                   print_freq=8),
}

if __name__ == '__main__':
    run(main, get_args_parser(), PRESETS)
