"""PixMIM with multi-level feature fusion (PixMIM: Liu et al., TMLR 2024; MFF: Liu et al., ICCV 2023).

PixMIM changes exactly two things in MAE; everything else, the MFF encoder included, is
mae_mff.py's MaskedAutoencoder, imported unchanged:

  1. the reconstruction target is the low-frequency part of the image: an ideal circular low-pass
     filter in the 2-D Fourier domain (radius 40 px at 224 px), `low_freq_target` below;
  2. the simple resized crop (bilinear resize + padded random crop + flip) replaces RandomResizedCrop.

norm_pix_loss stays on (applied to the filtered target). MFF is on by default with mae_mff.py's
switches; `--mff_layers none` gives plain PixMIM.

    python pixmim_mff.py --preset laptop                          # built-in data, CPU, ~2.5 minutes
    torchrun --nproc_per_node=8 pixmim_mff.py --epochs 800 --data_path /imagenet
"""
import math
import time

import torch

from common import (IMAGENET_MEAN, IMAGENET_STD, InputError, LossTracker, autocast, build_dataset, epochs,
                    init_distributed, log_epoch, log_fusion_weights, lr_at, no_sync_unless, prepare_training, progress,
                    resume_path, run, save_training_state, set_lr, to_device, train_view, use_recipe)
from mae_mff import PRESETS as MAE_PRESETS
from mae_mff import build_model, get_args_parser as mae_args_parser


# ----------------------------------------------------------------------------------------------
# Change 1: the low-frequency target (PixMIM Sec. 3.2).

def lpf_radius(args):
    """--lpf_radius, or 40 px scaled with the image size (40 at 224, ~5.7 at 32)."""
    return args.lpf_radius if args.lpf_radius is not None else 40. * args.input_size / 224


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


def pixmim_loss(model, imgs, mask_ratio, radius):
    """MAE/MFF forward with the low-frequency target in place of the image (Eq. 1 of PixMIM)."""
    target = low_freq_target(imgs, radius)                               # no grad, fp32
    with autocast(imgs.device):
        return model(imgs, mask_ratio, target_imgs=target)[0]


# ----------------------------------------------------------------------------------------------
# Training loop (change 2, the simple crop, is the `crop='simple'` of the reference recipe below).

def resolve_recipe(args):
    """'auto' flags -> mmselfsup's PixMIM / mmpretrain's MFF-PixMIM: simple crop, mmpretrain's wd groups."""
    use_recipe(args, crop='simple', wd_rule='mmpretrain')
    return 'PixMIM as mmselfsup' if args.mff_layers == 'none' else 'MFF-PixMIM as mmpretrain'


def train_one_epoch(model, loader, optimizer, device, epoch, step, args, rank, world_size, last_ckpt):
    """One pass over this rank's shard; returns (global optimizer step, mean loss, images/s)."""
    model.train()
    tracker = LossTracker(device)
    micro_steps = len(loader) // args.accum_iter * args.accum_iter
    bar = progress(loader, rank, total=micro_steps, desc=f'epoch {epoch}')
    radius, start = lpf_radius(args), time.time()
    for i, (imgs, _) in enumerate(bar):
        if i == micro_steps:
            break
        if i % args.accum_iter == 0:
            set_lr(optimizer, lr_at(epoch + i / micro_steps, args))
        imgs = to_device(imgs, device)
        last_micro = (i + 1) % args.accum_iter == 0
        with no_sync_unless(model, last_micro):
            loss = pixmim_loss(model, imgs, args.mask_ratio, radius)
            (loss / args.accum_iter).backward()
        if last_micro:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        tracker.add(step, loss)
        if (i + 1) % args.print_freq == 0:
            tracker.check(last_ckpt)
            log_fusion_weights(args, rank, model, epoch + (i + 1) / micro_steps, step)
            bar.set_postfix(loss=f"{tracker.mean(1)['loss']:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    tracker.check(last_ckpt)
    return step, tracker.mean(world_size)['loss'], micro_steps * args.batch_size * world_size / (time.time() - start)


def main(args):
    rank, world_size, device = init_distributed()
    reference = resolve_recipe(args)
    if lpf_radius(args) < smallest_radius(args.input_size) or lpf_radius(args) <= 0:
        smallest = math.ceil(smallest_radius(args.input_size) * 1e4) / 1e4  # rounded up: it keeps DC
        raise InputError(f'--lpf_radius {args.lpf_radius} keeps no frequency, not even the mean (DC), so the target '
                         f'is all zeros: use {f"at least {smallest:g}" if smallest else "more than 0"} at '
                         f'{args.input_size} px (the paper\'s 40 x input_size / 224 is {40 * args.input_size / 224:.3g})')
    torch.manual_seed(args.seed)
    raw_model = build_model(args).to(device)
    dataset = build_dataset(args, 'train', train_view(args, args.crop))
    model, loader, sampler, optimizer, start_epoch, step = prepare_training(
        args, raw_model, dataset, rank, world_size, device, f'{reference}, low-pass radius '
        f'{lpf_radius(args):.3g} px, mff_layers {raw_model.mff_layers or "off"}')
    last_ckpt = resume_path(args)                                        # named if the loss goes bad
    for epoch in epochs(args, sampler, rank, start_epoch):
        step, loss, speed = train_one_epoch(model, loader, optimizer, device, epoch, step, args, rank,
                                            world_size, last_ckpt)
        last_ckpt = save_training_state(args, raw_model, optimizer, epoch + 1, step, rank)  # rank 0 writes
        log_epoch(args, rank, {'epoch': epoch + 1, 'step': step, 'loss': loss,
                               'lr': optimizer.param_groups[0]['lr'], 'images_per_s': round(speed, 1),
                               'fusion_weights': raw_model.fusion_weights()})
    return raw_model


def get_args_parser():
    """mae_mff.py's flags, plus --lpf_radius; norm_pix on, --crop/--wd_rule auto = resolve_recipe."""
    p = mae_args_parser(__doc__.split('\n')[0])
    p.add_argument('--lpf_radius', type=float, default=None,
                   help='low-pass radius in pixels (default 40 x input_size / 224)')
    p.set_defaults(norm_pix_loss=True)
    return p


PRESETS = {'laptop': dict(MAE_PRESETS['laptop'], output_dir='./output/pixmim_mff_laptop')}

if __name__ == '__main__':
    run(main, get_args_parser(), PRESETS)
