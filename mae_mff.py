"""MAE with multi-level feature fusion (MFF; Liu et al., ICCV 2023) -- model, loss, data, DDP loop.

MAE reconstructs pixels from the last encoder block alone, so that block spends capacity on
low-level detail. MFF also feeds projected outputs of shallow blocks to the decoder (Eq. 2-4):

    O = sum_i w_i * P_i(x_i) + w_last * x_last,   w = softmax(fusion logits)   (Eq. 4)

and the encoder's final LayerNorm is applied to O. With mff_layers=() this file is plain MAE and
loads the official MAE checkpoints with strict=True. The defaults reproduce the run behind each
method's published numbers (`resolve_recipe`, printed at start-up): MFF-MAE = mmpretrain's MFF config
(PixMIM's simple crop, mmpretrain's weight-decay groups, fusion logits decayed); `--mff_layers none`
= official MAE (RandomResizedCrop(0.2, 1), MAE's groups: cls and mask tokens decayed).

    python mae_mff.py --preset laptop                          # built-in data, CPU, ~3 minutes
    torchrun --nproc_per_node=8 mae_mff.py --epochs 300 --data_path /imagenet
"""
import argparse
import time

import torch
import torch.nn as nn

from common import (WD_RULES, Block, InputError, LayerNorm, LossTracker, VIT_SIZES, ViTEncoder, add_common_args,
                    autocast, build_dataset, epochs, init_distributed, init_weights, log_epoch, log_fusion_weights,
                    lr_at, masked_mse, no_sync_unless, patchify, pixel_targets, prepare_training, progress,
                    random_masking, restore_order, resume_path, run, save_training_state, set_lr, sincos_pos_embed_2d,
                    to_device, train_view, unpatchify, use_recipe)


def paper_mff_layers(depth):
    """The paper's 6 levels: [0, 2, 4, 6, 8, 11] at depth 12, spread evenly from 0 to the last block otherwise."""
    return sorted({(i * (depth - 1)) // 5 for i in range(5)} | {depth - 1})


class MultiLevelFusion(nn.Module):
    """Project the shallow levels (Eq. 3) and fuse all levels (Eq. 4, or Eq. 5 with fusion='attn')."""

    def __init__(self, dim, layers, depth, num_heads, proj='linear', fusion='weighted', detach_shallow=False):
        super().__init__()
        self.layers = sorted(set(layers))                                # block indices, deepest last
        if self.layers[0] < 0 or self.layers[-1] != depth - 1:
            raise InputError(f'mff_layers {list(layers)} must lie in 0..{depth - 1} and end at the last '
                             f'block {depth - 1}, e.g. {paper_mff_layers(depth)}')
        num_levels = len(self.layers)
        if proj not in ('linear', 'mlp', 'none') or fusion not in ('weighted', 'attn'):
            raise InputError(f"MFF projection '{proj}' / fusion '{fusion}' unknown: use "
                             "linear|mlp|none and weighted|attn")
        make = {'linear': lambda: nn.Linear(dim, dim),
                'mlp': lambda: nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim)),
                'none': nn.Identity}[proj]
        self.proj = nn.ModuleList([make() for _ in range(num_levels - 1)])  # last level used as is
        self.detach_shallow = detach_shallow                             # paper A.8 ablation
        if fusion == 'weighted':
            # Equal weights at start. Weight-decayed (0.05) like the reference run: mmpretrain stores
            # them as a (levels, 1, 1, 1) tensor its rule does not exempt; kept 1-D here, and the
            # 'mmpretrain' rule of common.param_groups (MFF's default) decays them by name.
            self.fusion_logits = nn.Parameter(torch.ones(num_levels))
        else:
            self.fusion_attn = Block(dim, num_heads, qkv_bias=True, norm_layer=LayerNorm)
        self.apply(init_weights)                                         # xavier projections, zero bias

    def weights(self):
        """Softmaxed fusion weights (shallow ... last), or None for attention fusion."""
        return self.fusion_logits.softmax(0) if hasattr(self, 'fusion_logits') else None

    def logged_weights(self):
        """The weights as a short list for the log (None for attention fusion)."""
        w = self.weights()
        return None if w is None else [round(v, 4) for v in w.tolist()]

    def forward(self, levels):                                           # list of (N, T, D), deepest last
        feats = [p(x.detach() if self.detach_shallow else x) for p, x in zip(self.proj, levels[:-1])]  # Eq. 3
        feats.append(levels[-1])
        w = self.weights()
        if w is not None:                                                # Eq. 4, in fp32 under autocast
            # like mmpretrain (its torch.stack promotes): bf16 would round the weights and the sum
            dtype = torch.promote_types(w.dtype, torch.float32)          # fp32, or fp64 for a double model
            return sum(wi * f.to(dtype) for wi, f in zip(w.to(dtype), feats))  # (N, T, D)
        n, t, d = levels[-1].shape                                       # Eq. 5: attend across levels
        stacked = torch.stack(feats, dim=2).reshape(n * t, len(feats), d)
        return self.fusion_attn(stacked)[:, -1].reshape(n, t, d)


class MaskedAutoencoder(ViTEncoder):
    """MAE (official constructor keywords and state-dict names) with optional MFF before the decoder."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.,
                 norm_pix_loss=False, mff_layers=(), mff_proj='linear', mff_fusion='weighted',
                 mff_detach=False):
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio)
        self.in_chans, self.norm_pix_loss = in_chans, norm_pix_loss
        self.mff = (MultiLevelFusion(embed_dim, mff_layers, depth, num_heads, mff_proj, mff_fusion, mff_detach)
                    if len(mff_layers) else None)
        self.mff_layers = self.mff.layers if self.mff is not None else []

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        grid = img_size // patch_size
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed_2d(decoder_embed_dim, grid)[None],
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
            for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        for m in [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred]:
            m.apply(init_weights)
        nn.init.normal_(self.mask_token, std=.02)

    def patchify(self, imgs):
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x):
        return unpatchify(x, self.patch_size, channels=self.in_chans)

    def fusion_weights(self):
        return self.mff.logged_weights() if self.mff is not None else None

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """-> latent (N, 1 + K, D) after the final norm, mask (N, L), ids_restore (N, L)."""
        ids_keep, mask, ids_restore = random_masking(imgs.shape[0], self.num_patches, mask_ratio,
                                                     imgs.device, noise)
        x = self.embed(imgs, ids_keep)                                   # (N, 1 + K, D)
        if self.mff is None:
            x = self.forward_blocks(x, [self.depth - 1])[-1]
        else:
            levels = self.forward_blocks(x, self.mff_layers)             # Eq. 2: x_i, raw residual streams
            x = self.mff(levels)                                         # Eq. 3-4; the norm comes after
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        """latent (N, 1 + K, D) -> per-patch pixel predictions (N, L, p*p*C)."""
        x = self.decoder_embed(x)                                        # (N, 1 + K, Dd)
        x = restore_order(x, self.mask_token, ids_restore) + self.decoder_pos_embed  # (N, 1 + L, Dd)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]           # drop cls

    def forward_loss(self, imgs, pred, mask):
        """MSE on masked patches only; with norm_pix_loss each target patch is standardised."""
        return masked_mse(pred, pixel_targets(imgs, self.patch_size, self.norm_pix_loss), mask)

    def forward(self, imgs, mask_ratio=0.75, target_imgs=None, noise=None):
        """-> (loss, pred, mask). target_imgs replaces imgs as the reconstruction target (PixMIM)."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs if target_imgs is None else target_imgs, pred, mask)
        return loss, pred, mask


def mae_vit(size, patch_size=16, **kwargs):
    """MaskedAutoencoder of a standard ViT size with the MAE decoder (512 wide, 8 deep, 16 heads);
    MFF on the paper's levels for that depth unless mff_layers is given (() = plain MAE)."""
    arch = {**VIT_SIZES[size], **{k: kwargs.pop(k) for k in ('depth',) if k in kwargs}}
    kwargs.setdefault('mff_layers', paper_mff_layers(arch['depth']))
    return MaskedAutoencoder(patch_size=patch_size, **arch, **kwargs)


def mae_vit_tiny_patch16(**kwargs):
    return mae_vit('tiny', 16, **kwargs)


def mae_vit_small_patch16(**kwargs):
    return mae_vit('small', 16, **kwargs)


def mae_vit_base_patch16(**kwargs):
    return mae_vit('base', 16, **kwargs)


def mae_vit_large_patch16(**kwargs):
    return mae_vit('large', 16, **kwargs)


def mae_vit_huge_patch14(**kwargs):
    return mae_vit('huge', 14, **kwargs)


# --model names: every size with patch 14 or 16 (--patch_size overrides the name's patch).
MODELS = {f'mae_vit_{size}_patch{p}': (size, p) for size in VIT_SIZES for p in (14, 16)}


def parse_mff_layers(spec, depth):
    """--mff_layers value -> sorted block indices ([] = MFF off)."""
    if spec == 'paper':
        return paper_mff_layers(depth)
    if spec == 'none':
        return []
    try:
        return [int(v) for v in spec.split(',')]
    except ValueError:
        raise InputError(f"--mff_layers '{spec}' is not 'paper', 'none' or a comma "
                         'list of block indices like 0,2,4,6,8,11') from None


def encoder_depth(args, size):
    """--depth if given (small studies: fewer blocks, same width), else the size's standard depth."""
    depth = getattr(args, 'depth', None) or VIT_SIZES[size]['depth']
    if depth < 1:
        raise InputError(f'--depth {depth} < 1: give at least one encoder block, or omit it for the standard depth')
    return depth


def build_model(args):
    """MaskedAutoencoder from the command line (factory name + overrides)."""
    if args.model not in MODELS:
        raise InputError(f"unknown --model '{args.model}': choose one of {', '.join(MODELS)}")
    size, patch = MODELS[args.model]
    depth = encoder_depth(args, size)
    layers = parse_mff_layers(args.mff_layers, depth)
    return mae_vit(
        size, args.patch_size or patch, img_size=args.input_size, depth=depth,
        decoder_embed_dim=args.decoder_embed_dim, decoder_depth=args.decoder_depth,
        decoder_num_heads=args.decoder_num_heads, norm_pix_loss=args.norm_pix_loss,
        mff_layers=layers, mff_proj=args.mff_proj, mff_fusion=args.mff_fusion, mff_detach=args.mff_detach)


# ----------------------------------------------------------------------------------------------
# Training loop

def train_one_epoch(model, loader, optimizer, device, epoch, step, args, rank, world_size, last_ckpt):
    """One pass over this rank's shard; returns (global optimizer step, mean loss, images/s)."""
    model.train()
    tracker = LossTracker(device)
    micro_steps = len(loader) // args.accum_iter * args.accum_iter      # drop a ragged accumulation tail
    bar = progress(loader, rank, total=micro_steps, desc=f'epoch {epoch}')
    start = time.time()
    for i, (imgs, _) in enumerate(bar):
        if i == micro_steps:
            break
        if i % args.accum_iter == 0:                                     # per-iteration lr schedule
            set_lr(optimizer, lr_at(epoch + i / micro_steps, args))
        imgs = to_device(imgs, device)
        last_micro = (i + 1) % args.accum_iter == 0
        with no_sync_unless(model, last_micro):
            with autocast(device):
                loss = model(imgs, args.mask_ratio)[0]
            (loss / args.accum_iter).backward()
        if last_micro:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        tracker.add(step, loss)
        if (i + 1) % args.print_freq == 0:                               # the only host syncs
            tracker.check(last_ckpt)
            log_fusion_weights(args, rank, model, epoch + (i + 1) / micro_steps, step)
            bar.set_postfix(loss=f"{tracker.mean(1)['loss']:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    tracker.check(last_ckpt)
    images = micro_steps * args.batch_size * world_size
    return step, tracker.mean(world_size)['loss'], images / (time.time() - start)


def resolve_recipe(args):
    """'auto' flags -> the reference run behind the published numbers: MFF-MAE = mmpretrain's MFF config
    (simple crop, mmpretrain's weight-decay groups); plain MAE = official MAE (RandomResizedCrop, MAE's groups)."""
    mff = args.mff_layers != 'none'
    use_recipe(args, crop='simple' if mff else 'rrc', wd_rule='mmpretrain' if mff else 'mae')
    return 'MFF-MAE as mmpretrain' if mff else 'MAE as the official code'


def main(args):
    """Data, model, optimiser, resume, then epochs with a checkpoint and a log line after each."""
    rank, world_size, device = init_distributed()
    reference = resolve_recipe(args)
    torch.manual_seed(args.seed)                                         # same init on every rank
    raw_model = build_model(args).to(device)
    dataset = build_dataset(args, 'train', train_view(args, args.crop))
    model, loader, sampler, optimizer, start_epoch, step = prepare_training(
        args, raw_model, dataset, rank, world_size, device,
        f'{reference}, mff_layers {raw_model.mff_layers or "off"}')
    last_ckpt = resume_path(args)                                        # named if the loss goes bad
    for epoch in epochs(args, sampler, rank, start_epoch):
        step, loss, speed = train_one_epoch(model, loader, optimizer, device, epoch, step, args, rank,
                                            world_size, last_ckpt)
        last_ckpt = save_training_state(args, raw_model, optimizer, epoch + 1, step, rank)  # rank 0 writes
        log_epoch(args, rank, {'epoch': epoch + 1, 'step': step, 'loss': loss,
                               'lr': optimizer.param_groups[0]['lr'], 'images_per_s': round(speed, 1),
                               'fusion_weights': raw_model.fusion_weights()})
    return raw_model


def get_args_parser(description=__doc__.split('\n')[0]):
    p = argparse.ArgumentParser(description=description)
    a = p.add_argument
    a('--preset', choices=sorted(PRESETS), help='laptop: tiny ViT, 32 px, built-in data, ~3 min on 2 CPU cores')
    a('--model', default='mae_vit_base_patch16', help=f"one of {', '.join(MODELS)}")
    a('--input_size', type=int, default=224)
    a('--patch_size', type=int, default=None, help="overrides the model name's patch size")
    a('--depth', type=int, default=None, help="encoder blocks; overrides the model size's depth (small studies)")
    a('--mask_ratio', type=float, default=0.75, help='fraction of patches removed')
    a('--norm_pix_loss', action=argparse.BooleanOptionalAction, default=True,
      help='standardise each target patch (on in the MFF/PixMIM recipes; --no-norm_pix_loss = raw pixels)')
    a('--decoder_embed_dim', type=int, default=512)
    a('--decoder_depth', type=int, default=8)
    a('--decoder_num_heads', type=int, default=16)
    a('--mff_layers', default='paper',
      help="blocks to fuse: 'paper' ([0,2,4,6,8,11] at depth 12), 'none' (plain MAE) or e.g. '0,11'")
    a('--mff_proj', default='linear', choices=['linear', 'mlp', 'none'], help='projection of shallow levels')
    a('--mff_fusion', default='weighted', choices=['weighted', 'attn'], help='Eq. 4 (weighted) or Eq. 5 (attn)')
    a('--mff_detach', action='store_true', help='no gradient into shallow blocks through the fusion (A.8)')
    a('--crop', default='auto', choices=['auto', 'rrc', 'simple'],
      help="rrc: RandomResizedCrop(0.2, 1), bicubic, as MAE; simple: PixMIM's bilinear resize + padded random "
           "crop. auto: the method's reference (MFF-MAE, PixMIM: simple; MAE, PiLaMIM: rrc)")
    a('--wd_rule', default='auto', choices=['auto', *WD_RULES],
      help="which parameters get weight decay (common.param_groups): mae = all but 1-D and biases; "
           "mmpretrain = all but norms, biases, pos_embed, mask/cls tokens; all = every one. "
           "auto: the method's reference (MAE: mae; MFF-MAE, PixMIM: mmpretrain; PiLaMIM: all)")
    add_common_args(p)
    # Paper recipe: 128 per GPU x 4 accumulation x 8 GPUs = 4096 images per step.
    p.set_defaults(batch_size=128, accum_iter=4)
    return p


PRESETS = {
    'laptop': dict(model='mae_vit_tiny_patch16', input_size=32, patch_size=4, decoder_embed_dim=128,
                   decoder_depth=2, decoder_num_heads=4, batch_size=128, accum_iter=1, epochs=5,
                   warmup_epochs=1, blr=1.5e-3, builtin_size=4096, num_workers=1, save_freq=4,
                   output_dir='./output/mae_mff_laptop', print_freq=8),
}

if __name__ == '__main__':
    run(main, get_args_parser(), PRESETS)
