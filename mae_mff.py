"""MAE with multi-level feature fusion (MFF; Liu et al., ICCV 2023) -- model, loss, data, DDP loop.

MAE reconstructs pixels from the last encoder block alone, so that block spends capacity on
low-level detail. MFF also feeds projected outputs of shallow blocks to the decoder (Eq. 2-4):

    O = sum_i w_i * P_i(x_i) + w_last * x_last,   w = softmax(fusion logits)   (Eq. 4)

and the encoder's final LayerNorm is applied to O. --model names MAE's architecture as the official
code does (mae_vit_base_patch16: ViT-B/16 with the 512-wide, 8-block decoder); MFF is --mff_layers,
'paper' by default because this script's reference run is MFF-MAE; `--mff_layers none` is plain MAE,
whose state dict is the official one (official MAE checkpoints load with strict=True).

Paper -> code:
    Eq. 2  x_i, raw residual stream after block i     ViTEncoder.forward_blocks (common.py)
    Eq. 3  P_i(x_i), one projection per shallow level  MultiLevelFusion.proj, MultiLevelFusion.forward
    Eq. 4  softmax-weighted sum, then the final norm   MultiLevelFusion.weights / forward, forward_encoder
    Eq. 5  attention over levels (ablation)            MultiLevelFusion(fusion='attn')
    A.8    detached shallow levels (ablation)          MultiLevelFusion(detach_shallow=True)
    MAE    masking; masked-patch MSE, norm_pix         common.random_masking; forward_loss (common.masked_mse)
Defaults = the reference run behind the published numbers (resolve_recipe, printed at start-up):
MFF-MAE = mmpretrain's MFF config (PixMIM's simple crop, mmpretrain's weight-decay groups, fusion
logits decayed); `--mff_layers none` = official MAE (RandomResizedCrop(0.2, 1), MAE's groups: cls and
mask tokens decayed). Departures from the reference code: the fusion logits are a 1-D tensor
(mmpretrain: (levels, 1, 1, 1)); bf16 autocast without a grad scaler instead of fp16 AMP; every RNG
re-seeded per epoch from (seed, epoch, rank) (common.seed_epoch), so a resumed run is bit-identical.

    python mae_mff.py --preset laptop                          # built-in data, CPU, ~2 minutes
    torchrun --nproc_per_node=8 mae_mff.py --epochs 300 --data_path /imagenet
"""
import argparse
import json
import os
import time

import torch
import torch.nn as nn

from common import (WD_RULES, Block, InputError, LayerNorm, LossTracker, ViTEncoder, adamw, add_common_args,
                    autocast, build_dataset, check_mask_ratio, compile_model, init_distributed, init_weights,
                    log_epoch, lr_at, make_loader, make_output_dir, masked_mse, no_sync_unless, pixel_targets,
                    progress, random_masking, remove_stale_temp_files, restore_order, resume, resume_path, run,
                    run_summary, save_training_state, scale_lr, seed_epoch, set_lr, sincos_pos_embed_2d, start_log,
                    to_device, train_view, vit_arch, wrap_ddp)

SCRIPT = os.path.basename(__file__)                  # recorded in every checkpoint: analyze.py rebuilds from it


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
    """MAE (official constructor keywords and state-dict names) with optional MFF before the decoder.

    Meets the pre-training contract of common.py: forward -> (loss, pred, mask), reconstruction_target.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.,
                 norm_pix_loss=False, mff_layers=(), mff_proj='linear', mff_fusion='weighted',
                 mff_detach=False):
        super().__init__(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio)
        self.norm_pix_loss = norm_pix_loss
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

    def reconstruction_target(self, imgs):
        """The image the decoder reconstructs: MAE's is the input itself (PixMIM overrides this)."""
        return imgs

    def forward_loss(self, imgs, pred, mask):
        """MSE on masked patches only; with norm_pix_loss each target patch is standardised."""
        target = pixel_targets(self.reconstruction_target(imgs), self.patch_size, self.norm_pix_loss)
        return masked_mse(pred, target, mask)

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        """imgs (N, C, H, W) normalised -> (loss, pred (N, L, p*p*C), mask (N, L)); noise (N, L) fixes the mask."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


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


def build_model(args):
    """MaskedAutoencoder from the command line: --model (ViT size and patch), --depth, decoder and MFF flags."""
    arch = vit_arch(args.model, args.depth)
    return MaskedAutoencoder(
        img_size=args.input_size, **arch, decoder_embed_dim=args.decoder_embed_dim,
        decoder_depth=args.decoder_depth, decoder_num_heads=args.decoder_num_heads, norm_pix_loss=args.norm_pix_loss,
        mff_layers=parse_mff_layers(args.mff_layers, arch['depth']), mff_proj=args.mff_proj,
        mff_fusion=args.mff_fusion, mff_detach=args.mff_detach)


# ----------------------------------------------------------------------------------------------
# Training loop

FUSION_LOG = 'fusion_weights.jsonl'                  # the curve `analyze.py fusion` draws


def log_fusion_weights(args, rank, model, epoch, step):
    """Rank 0: append {'epoch' (fractional), 'step', 'levels', 'fusion_weights'} to <output_dir>/FUSION_LOG
    (MFF Figs. 1, 6, 8). Call it only where the loop syncs anyway: reading the weights is a host sync.
    No-op without weighted fusion."""
    model = getattr(model, 'module', model)                              # DDP -> (compiled) model
    model = getattr(model, '_orig_mod', model)                           # torch.compile -> raw model
    weights = model.fusion_weights()                                     # shallow ... last, or None
    if rank == 0 and weights is not None:
        with open(os.path.join(args.output_dir, FUSION_LOG), 'a') as f:
            f.write(json.dumps({'epoch': round(epoch, 4), 'step': step, 'levels': model.mff_layers,
                                'fusion_weights': weights}) + '\n')


def train_one_epoch(model, loader, optimizer, device, epoch, step, tracker, args):
    """One pass over this rank's shard; returns (global optimizer step, mean loss, images/s).

    tracker: the run's LossTracker (it knows rank, world size and the checkpoint a NaN message names).
    """
    model.train()
    tracker.start()
    micro_steps = len(loader) // args.accum_iter * args.accum_iter      # drop a ragged accumulation tail
    bar = progress(loader, tracker.rank, total=micro_steps, desc=f'epoch {epoch}')
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
            tracker.check()
            log_fusion_weights(args, tracker.rank, model, epoch + (i + 1) / micro_steps, step)
            bar.set_postfix(loss=f"{tracker.mean(1)['loss']:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    tracker.check()
    images = micro_steps * args.batch_size * tracker.world_size
    return step, tracker.mean()['loss'], images / (time.time() - start)


def resolve_recipe(args):
    """The start-up resolution, in one place: --crop / --wd_rule 'auto' -> the reference run behind the
    published numbers: MFF-MAE = mmpretrain's MFF config (simple crop, mmpretrain's weight-decay groups);
    plain MAE = official MAE (RandomResizedCrop, MAE's groups). -> the recipe line main prints."""
    mff = args.mff_layers != 'none'
    if args.crop == 'auto':
        args.crop = 'simple' if mff else 'rrc'
    if args.wd_rule == 'auto':
        args.wd_rule = 'mmpretrain' if mff else 'mae'
    return (f'{"MFF-MAE as mmpretrain" if mff else "MAE as the official code"}: crop {args.crop}, weight decay '
            f'{args.weight_decay} on the {args.wd_rule} groups (common.param_groups), norm_pix '
            f'{"on" if args.norm_pix_loss else "off"}, mff_layers {args.mff_layers}')


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
    """Argparse defaults = the reference recipe (MFF-MAE, ViT-B/16); --preset overrides some of them."""
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    a = p.add_argument
    a('--preset', choices=sorted(PRESETS), help='laptop: ViT-tiny/4, 32 px, built-in data, ~2 min on 2 CPU cores')
    a('--model', default='mae_vit_base_patch16',
      help='<name>_vit_<size>_patch<p>: ViT size (tiny, small, base, large, huge) and patch, with the MAE decoder')
    a('--input_size', type=int, default=224)
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
           "crop. auto: the reference of the run (MFF-MAE: simple; plain MAE: rrc)")
    a('--wd_rule', default='auto', choices=['auto', *WD_RULES],
      help="which parameters get weight decay (common.param_groups): mae = all but 1-D and biases; "
           "mmpretrain = all but norms, biases, pos_embed, mask/cls tokens; all = every one. "
           "auto: the reference of the run (MFF-MAE: mmpretrain; plain MAE: mae)")
    add_common_args(p)
    # Paper recipe: 128 per GPU x 4 accumulation x 8 GPUs = 4096 images per step.
    p.set_defaults(batch_size=128, accum_iter=4)
    return p


PRESETS = {
    'laptop': dict(model='mae_vit_tiny_patch4', input_size=32, decoder_embed_dim=128, decoder_depth=2,
                   decoder_num_heads=4, batch_size=128, accum_iter=1, epochs=5, warmup_epochs=1, blr=1.5e-3,
                   builtin_size=4096, num_workers=1, save_freq=4, output_dir='./output/mae_mff_laptop', print_freq=8),
}

if __name__ == '__main__':
    run(main, get_args_parser(), PRESETS)
