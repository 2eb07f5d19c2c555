"""End-to-end fine-tuning of a pre-trained ViT (MAE's protocol), low-shot fine-tuning and robustness evaluation.

The whole encoder trains, with a fresh head on the average of the patch tokens; the recipe is MAE's
(FINETUNE.md: layer-wise lr decay, RandAugment, Mixup/CutMix, drop path), NOT the official script's
argparse defaults. The model is timm's VisionTransformer(global_pool='avg'), so the fine-tuned weights
load into timm unchanged.

    python finetune.py --checkpoint output/mae_mff_laptop/checkpoint-last.pth          # built-in data, CPU
    torchrun --nproc_per_node=8 finetune.py --checkpoint mae_pretrain_vit_base.pth --data_path /imagenet \\
        --batch_size 32 --accum_iter 4                                               # ViT-B: 83.6 from MAE 1600 ep
    python finetune.py --eval --checkpoint output/finetune/checkpoint-last.pth --data_path /imagenet \\
        --eval_path /imagenet-r                                                      # evaluation only

Sections: model -> loss/mixup -> data (low-shot subsets, evaluation sets) -> loop -> CLI.
"""
import argparse
import json
import os

import torch
import torch.nn as nn
from PIL import Image
from timm.data import Mixup, auto_augment, create_transform
from timm.layers import resample_abs_pos_embed
from timm.loss import SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from torchvision import datasets

from common import (IMAGENET_MEAN, IMAGENET_STD, VIT_SIZES, InputError, LayerNorm, LossTracker, accuracy,
                    add_common_args, autocast, build_dataset, compile_model, epochs, init_distributed,
                    load_matching_state, load_rgb, log_epoch, lr_at, make_loader, make_output_dir, no_sync_unless,
                    progress, read_encoder,
                    remove_stale_temp_files, resume, resume_path, run, save_training_state, scale_lr, set_lr,
                    size_of, start_log, to_device, topk_hits, wrap_ddp)

# ----------------------------------------------------------------------------------------------
# Model: timm's ViT with a fresh head; the encoder weights come from the pre-training checkpoint.

# MAE FINETUNE.md, effective batch 1024 for all; chosen by depth (12 / 24 / 32 blocks; smaller ViTs take ViT-B's).
RECIPES = {'base': dict(epochs=100, blr=5e-4, layer_decay=0.65, drop_path=0.1),
           'large': dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.2),
           'huge': dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.3)}


def vit_classifier(arch, num_classes, drop_path=0., cls_token=False, qkv_bias=True):
    """timm VisionTransformer: mean of the patch tokens (cls excluded) -> fc_norm -> head, or
    with cls_token=True the [cls] token after the final norm (MAE's --cls_token variant)."""
    model = VisionTransformer(img_size=arch['img_size'], patch_size=arch['patch_size'], embed_dim=arch['embed_dim'],
                              depth=arch['depth'], num_heads=arch['num_heads'], mlp_ratio=arch['mlp_ratio'],
                              qkv_bias=qkv_bias, num_classes=num_classes, drop_path_rate=drop_path,
                              global_pool='token' if cls_token else 'avg', norm_layer=LayerNorm)
    nn.init.trunc_normal_(model.head.weight, std=2e-5)                  # MAE: a near-zero head at start
    nn.init.zeros_(model.head.bias)
    return model


def load_pretrained(model, state, path, cls_token=False):
    """Encoder weights into the classifier: the final norm dropped for avg pooling (fc_norm is fresh), the
    position embedding resized when the resolution differs (bicubic, cls row kept) and then trainable."""
    state = {k: v for k, v in state.items() if cls_token or not k.startswith('norm.')}
    state['pos_embed'] = resample_abs_pos_embed(state['pos_embed'], list(model.patch_embed.grid_size),
                                                num_prefix_tokens=1)
    missing, unexpected = load_matching_state(model, state, path, strict=False)
    fresh = {'head.weight', 'head.bias'} | (set() if cls_token else {'fc_norm.weight', 'fc_norm.bias'})
    if set(missing) != fresh or unexpected:
        raise InputError(f'{path} does not fit a ViT classifier (missing {sorted(set(missing) - fresh)[:3]}, '
                         f'unexpected {unexpected[:3]}): pass a pre-training checkpoint'
                         + ('' if cls_token else ', or add --cls_token for one without a final norm'))


def layer_decay_optimizer(model, args, device):
    """AdamW (0.9, 0.999) on timm's layer-decay groups: patch_embed/cls_token/pos_embed are layer 0, block i
    layer i + 1, fc_norm/head layer depth + 1; lr_scale = decay^(depth + 1 - layer); no weight decay for
    1-D params, pos_embed and cls_token. common.set_lr multiplies each group's lr by its lr_scale."""
    groups = param_groups_layer_decay(model, args.weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=args.layer_decay)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), fused=device.type == 'cuda')


# ----------------------------------------------------------------------------------------------
# Loss and Mixup/CutMix (label smoothing happens inside Mixup, which makes soft targets).

def mixup_and_loss(args, num_classes):
    """-> (Mixup or None, criterion). MAE: mixup 0.8, cutmix 1.0, prob 1, switch 0.5, batch mode."""
    if args.mixup > 0 or args.cutmix > 0:
        if args.batch_size % 2:
            raise InputError(f'--batch_size {args.batch_size} is odd: Mixup/CutMix pair each image with its mirror '
                             'in the batch, so pass an even --batch_size of at least 2, or --mixup 0 --cutmix 0')
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=1.0, switch_prob=0.5, mode='batch',
                      label_smoothing=args.smoothing, num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    return None, nn.CrossEntropyLoss(label_smoothing=args.smoothing)


# ----------------------------------------------------------------------------------------------
# Data: timm's augmentation, low-shot subsets, evaluation sets.

def posterize_any_bits(img, bits_to_keep, **kw):
    """timm's posterize, with 0 bits -> a black image as in the Pillow the MAE recipe ran on. Recent Pillow
    refuses 0 bits, which RandAugment's 'inc1' posterize asks for at magnitude 10 (m9 + mstd0.5 gets there)."""
    return Image.new(img.mode, img.size) if bits_to_keep < 1 else auto_augment.posterize(img, bits_to_keep, **kw)


for _name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
    auto_augment.NAME_TO_OP[_name] = posterize_any_bits


def train_transform(args):
    """RandomResizedCrop(crop_min-1, bicubic) + flip + RandAugment + random erasing (pixel mode); no colour jitter."""
    return create_transform(args.input_size, is_training=True, scale=(args.crop_min, 1.), color_jitter=None,
                            auto_augment=args.aa or None,
                            interpolation='bicubic', re_prob=args.reprob, re_mode='pixel', re_count=1,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


def eval_transform(size):
    """Resize to size / 0.875 (256 for 224; no enlargement above 224) + center crop, bicubic."""
    return create_transform(size, is_training=False, interpolation='bicubic', crop_pct=0.875 if size <= 224 else 1.,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)


def low_shot_indices(targets, fraction, seed):
    """Each class keeps round(fraction x its images), at least one, drawn from `seed` alone: the same images
    on every rank and every resume. -> sorted dataset indices."""
    if not 0 < fraction <= 1:
        raise InputError(f'--train_fraction {fraction} is outside (0, 1]: use e.g. 0.01 or 0.1 (the paper\'s 1% / 10%)')
    targets = torch.as_tensor(targets)
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in targets.unique(sorted=True):
        idx = (targets == c).nonzero().flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:max(1, round(fraction * len(idx)))]])
    return torch.cat(keep).sort().values.tolist()


def subset_file_indices(dataset, path):
    """SimCLR's 1percent.txt / 10percent.txt: one file name (nXXXXXXXX_NNNN.JPEG) a line. -> dataset indices."""
    if not os.path.isfile(path):
        raise InputError(f'--subset_file {path} does not exist: download 1percent.txt / 10percent.txt from the '
                         'SimCLR repository (imagenet_subsets/)')
    names = [line.strip() for line in open(path) if line.strip()]
    where = {os.path.basename(p): i for i, (p, _) in enumerate(dataset.samples)}
    missing = [n for n in names if n not in where]
    if missing:
        raise InputError(f'--subset_file {path} names {len(missing)} images that are not in {dataset.root} '
                         f'(e.g. {missing[0]}): point --data_path at the full ImageNet train/ it was made for')
    return sorted(where[n] for n in names)


def low_shot(train_set, args):
    """The training subset (--train_fraction or --subset_file), or the whole set. -> (dataset, images per class)."""
    targets = train_set.targets
    if args.subset_file:
        if not args.data_path or args.train_fraction is not None:
            raise InputError('--subset_file needs --data_path (ImageNet train/) and excludes --train_fraction')
        idx = subset_file_indices(train_set, args.subset_file)
    elif args.train_fraction is not None:
        idx = low_shot_indices(targets, args.train_fraction, args.seed)
    else:
        idx = None
    kept = torch.as_tensor(targets)[idx] if idx is not None else torch.as_tensor(targets)
    per_class = torch.bincount(kept, minlength=len(train_set.classes))
    subset = torch.utils.data.Subset(train_set, idx) if idx is not None else train_set
    return subset, (int(per_class.min()), int(per_class.max()))


def eval_sets(args, classes):
    """--eval_path folders -> [(path, dataset, indices of its classes among the training classes)]."""
    sets = []
    for path in args.eval_path:
        try:
            ds = datasets.ImageFolder(path, transform=eval_transform(args.input_size), loader=load_rgb)
        except (FileNotFoundError, OSError) as e:
            raise InputError(f'--eval_path {path} is no image folder ({e}): expected {path}/<class>/<image>') from None
        unknown = [c for c in ds.classes if c not in classes]
        if unknown:
            raise InputError(f'--eval_path {path} has {len(unknown)} classes that are not training classes (e.g. '
                             f"'{unknown[0]}'): its folders must be named like the train/ folders (ImageNet wnids)")
        sets.append((path, ds, [classes.index(c) for c in ds.classes]))
    return sets


# ----------------------------------------------------------------------------------------------
# Loop.

def train_one_epoch(model, loader, optimizer, mixup, criterion, device, epoch, step, args, rank, world_size,
                    last_ckpt):
    """One pass over this rank's shard; returns (global optimizer step, mean loss)."""
    model.train()
    tracker = LossTracker(device)
    micro_steps = len(loader) // args.accum_iter * args.accum_iter      # drop a ragged accumulation tail
    bar = progress(loader, rank, total=micro_steps, desc=f'epoch {epoch}')
    for i, (imgs, y) in enumerate(bar):
        if i == micro_steps:
            break
        if i % args.accum_iter == 0:                                     # per-iteration; x lr_scale per group
            set_lr(optimizer, lr_at(epoch + i / micro_steps, args))
        imgs, y = to_device(imgs, device), y.to(device, non_blocking=True)
        if mixup is not None:
            imgs, y = mixup(imgs, y)                                     # y: soft targets (N, K)
        last_micro = (i + 1) % args.accum_iter == 0
        with no_sync_unless(model, last_micro):
            with autocast(device):
                loss = criterion(model(imgs), y)
            (loss / args.accum_iter).backward()
        if last_micro:
            if args.clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        tracker.add(step, loss)
        if (i + 1) % args.print_freq == 0:                               # the only host syncs
            tracker.check(last_ckpt)
            bar.set_postfix(loss=f"{tracker.mean(1)['loss']:.4f}", lr=f"{optimizer.param_groups[-1]['lr']:.2e}")
    tracker.check(last_ckpt)
    return step, tracker.mean(world_size)['loss']


@torch.no_grad()
def evaluate(model, loader, device, world_size, num_classes, class_ids=None):
    """-> (top-1, top-5 or None) in %, every image counted once under torchrun (common.accuracy).
    class_ids restricts the logits to a subset of the classes (ImageNet-A/-R: 200 of the 1000)."""
    model.eval()
    hits = torch.zeros(3, dtype=torch.float64, device=device)           # [top-1 hits, top-5 hits, images]
    k = num_classes if class_ids is None else len(class_ids)
    for imgs, y in loader:
        with autocast(device):
            logits = model(to_device(imgs, device)).float()            # (N, K)
        if class_ids is not None:
            logits = logits[:, class_ids]                                # (N, classes of this set)
        hits += topk_hits(logits, y.to(device), k)
    return accuracy(hits, world_size, k)


def resolve_defaults(args, arch):
    """The recipe row of the model's depth unless flags override it; a quick setting on the built-in data."""
    row = RECIPES['huge' if arch['depth'] >= 32 else 'large' if arch['depth'] >= 24 else 'base']
    builtin = not args.data_path
    recipe = dict(row, warmup_epochs=5, batch_size=32, accum_iter=4, num_workers=10, crop_min=0.08,
                  aa='rand-m9-mstd0.5-inc1', reprob=0.25, mixup=0.8, cutmix=1.0)
    # A few hundred steps on 32 px shapes: a larger lr, less layer decay, no RandAugment/erasing/Mixup, larger crops.
    quick = dict(epochs=5, warmup_epochs=1, blr=1e-2, layer_decay=0.9, batch_size=32, accum_iter=1, num_workers=0,
                 builtin_size=1024, crop_min=0.35, aa='', reprob=0., mixup=0., cutmix=0.)
    for k, v in (dict(recipe, **quick) if builtin else recipe).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def main(args):
    rank, world_size, device = init_distributed()
    if args.model and size_of(args.model)[0] is None:
        raise InputError(f"--model '{args.model}' names no ViT size: use e.g. vit_base_patch16, or omit it")
    state, ckpt = None, {}
    if args.checkpoint:                                                  # architecture from the weights
        state, arch, ckpt = read_encoder(args.checkpoint, args, check_input_size=False)
        args.input_size = args.input_size or arch['img_size']
    else:                                                                # supervised baseline from scratch
        size, patch = size_of(args.model or ('vit_base_patch16' if args.data_path else 'vit_tiny_patch4'))
        arch = dict(VIT_SIZES[size], patch_size=args.patch_size or patch, mlp_ratio=4.,
                    num_heads=args.num_heads or VIT_SIZES[size]['num_heads'])
        args.input_size = args.input_size or (224 if args.data_path else 32)
    arch['img_size'] = args.input_size
    resolve_defaults(args, arch)
    make_output_dir(args.output_dir)
    val_set = build_dataset(args, 'val', eval_transform(args.input_size))
    full = ckpt.get('model', ckpt) if isinstance(ckpt.get('model', ckpt), dict) else {}
    trained = 'head.weight' in full                                      # a fine-tuned checkpoint
    if args.eval and not trained:
        raise InputError(f'--eval needs a fine-tuned checkpoint with a classifier head; {args.checkpoint or "none"} '
                         'has none: fine-tune it first (drop --eval)')
    classes = val_set.classes
    if args.eval and ckpt.get('classes', classes) != classes:
        raise InputError(f'{args.checkpoint} was fine-tuned on other classes than val/ of {args.data_path} holds: '
                         'pass the --data_path it was fine-tuned on')
    num_classes = len(classes)
    cls_token = 'fc_norm.weight' not in full if args.eval else args.cls_token
    torch.manual_seed(args.seed)                                         # same init on every rank
    raw_model = vit_classifier(arch, num_classes, args.drop_path, cls_token,
                               qkv_bias=state is None or 'blocks.0.attn.qkv.bias' in state)
    if args.eval:
        if full['head.weight'].shape[0] != num_classes:
            raise InputError(f"{args.checkpoint} classifies {full['head.weight'].shape[0]} classes, the data has "
                             f'{num_classes}: pass the --data_path it was fine-tuned on')
        load_matching_state(raw_model, full, args.checkpoint)            # strict
    elif state is not None:
        load_pretrained(raw_model, state, args.checkpoint, cls_token)
    raw_model.to(device)
    val_loader = make_loader(val_set, args.batch_size, rank, world_size, args.num_workers, train=False)[0]
    extra_sets = eval_sets(args, classes)
    result = {'checkpoint': args.checkpoint or None, 'data': args.data_path or f'builtin:{args.builtin_label}',
              'num_classes': num_classes, 'pool': 'cls' if cls_token else 'avg'}

    if not args.eval:
        train_set = build_dataset(args, 'train', train_transform(args))
        if train_set.classes != val_set.classes:
            raise InputError(f'train/ and val/ of {args.data_path} hold different classes: give both the same '
                             'class folders')
        train_set, (lo, hi) = low_shot(train_set, args)
        mixup, criterion = mixup_and_loss(args, num_classes)
        loader, sampler = make_loader(train_set, args.batch_size, rank, world_size, args.num_workers, seed=args.seed,
                                      accum_iter=args.accum_iter)
        eff_batch = scale_lr(args, world_size)
        optimizer = layer_decay_optimizer(raw_model, args, device)
        start_epoch, step, resumed = resume(args, raw_model, optimizer)  # into the raw model, before compile/DDP
        best = resumed.get('best_top1', 0.) if resumed else 0.
        model = wrap_ddp(compile_model(raw_model) if args.compile else raw_model, device, world_size)
        if rank == 0:
            remove_stale_temp_files(args.output_dir)
            start_log(args, start_epoch if resumed else None)
            print(f"{args.checkpoint or 'from scratch (supervised baseline, no --checkpoint)'}: ViT D={arch['embed_dim']} "
                  f"depth={arch['depth']} patch {arch['patch_size']} at {args.input_size}px, {result['pool']} pool, "
                  f'{len(train_set)} train images ({lo}-{hi} per class) / {len(val_set)} val, {num_classes} classes, '
                  f'effective batch {eff_batch}, lr {args.lr:.3g}, layer decay {args.layer_decay}, drop path '
                  f'{args.drop_path}, {args.epochs} epochs, from epoch {start_epoch}', flush=True)
        last_ckpt, top1, top5 = resume_path(args), None, None
        for epoch in epochs(args, sampler, rank, start_epoch):
            step, loss = train_one_epoch(model, loader, optimizer, mixup, criterion, device, epoch, step, args, rank,
                                         world_size, last_ckpt)
            top1, top5 = evaluate(raw_model, val_loader, device, world_size, num_classes)
            best = max(best, top1)
            last_ckpt = save_training_state(args, raw_model, optimizer, epoch + 1, step, rank, best_top1=best,
                                            classes=classes)
            log_epoch(args, rank, {'epoch': epoch + 1, 'step': step, 'loss': loss,
                                   'lr': optimizer.param_groups[-1]['lr'], 'top1': round(top1, 2),
                                   'top5': top5 and round(top5, 2)})
        if top1 is None:                                                 # resumed a finished run
            top1, top5 = evaluate(raw_model, val_loader, device, world_size, num_classes)
        result.update(train_images=len(train_set), images_per_class=[lo, hi], best_top1=round(best, 2))
    else:
        top1, top5 = evaluate(raw_model, val_loader, device, world_size, num_classes)
    result.update(top1=round(top1, 2), top5=top5 and round(top5, 2), eval_path={})
    for path, ds, ids in extra_sets:
        loader = make_loader(ds, args.batch_size, rank, world_size, args.num_workers, train=False)[0]
        result['eval_path'][path] = round(evaluate(raw_model, loader, device, world_size, num_classes, ids)[0], 2)
    if rank == 0:
        print(f"top-1 {result['top1']:.2f}" + (f" (best {result['best_top1']:.2f})" if 'best_top1' in result else '')
              + (f', top-5 {top5:.2f}' if top5 is not None else '')
              + ''.join(f', {p}: top-1 {v:.2f}' for p, v in result['eval_path'].items()), flush=True)
        with open(os.path.join(args.output_dir, 'eval.json' if args.eval else 'finetune.json'), 'w') as f:
            json.dump(dict(result, args=vars(args)), f, indent=1)
    return result


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog=(
        'Defaults by model depth (MAE FINETUNE.md): ViT-B (and smaller) 100 epochs, blr 5e-4, layer decay 0.65, '
        'drop path 0.1; ViT-L 50 / 1e-3 / 0.75 / 0.2; ViT-H 50 / 1e-3 / 0.75 / 0.3; 5 warmup epochs, batch 32 x '
        'accum 4 per GPU (x 8 GPUs = 1024), RandAugment, erasing 0.25, Mixup 0.8 / CutMix 1.0. Built-in data (no '
        '--data_path), a few CPU minutes: 1024 images, 5 epochs, 1 warmup, blr 1e-2, layer decay 0.9, batch 32, '
        'crops >= 0.35, no RandAugment/erasing/Mixup/CutMix, no loader workers. Explicit flags win.'))
    a = p.add_argument
    a('--checkpoint', default='', help='pre-training checkpoint (ours, official MAE, timm state dict); none = '
      'train from scratch, the supervised baseline. With --eval: a fine-tuned checkpoint')
    a('--model', default='', help='from scratch: the ViT, e.g. vit_base_patch16 (default; vit_tiny_patch4 on '
      'built-in data); with --checkpoint only a check (the architecture is read from the weights)')
    a('--input_size', type=int, default=None, help="default: the checkpoint's; another size resizes the position "
      'embedding (bicubic)')
    a('--patch_size', type=int, default=None, help='from scratch: overrides the name; else only a check')
    a('--num_heads', type=int, default=None, help='needed only for weights of a non-standard width')
    a('--cls_token', action='store_true', help='classify the [cls] token after the final norm instead of the '
      'average patch token + fc_norm (MAE default)')
    a('--layer_decay', type=float, default=None, help='layer-wise lr decay (0.65 ViT-B, 0.75 ViT-L/H)')
    a('--drop_path', type=float, default=None, help='stochastic depth rate (0.1 ViT-B, 0.2 ViT-L, 0.3 ViT-H)')
    a('--clip_grad', type=float, default=None, help='clip the gradient norm (off in the MAE recipe; try 1.0 if '
      'the loss spikes)')
    a('--crop_min', type=float, default=None, help='smallest RandomResizedCrop area (0.08 in the recipe; 0.35 on '
      'built-in data, whose 32 px images hold 1-4 small objects a smaller crop often misses)')
    a('--aa', default=None, help="timm RandAugment policy (rand-m9-mstd0.5-inc1); '' = off")
    a('--reprob', type=float, default=None, help='random erasing probability (0.25; pixel mode, one box)')
    a('--mixup', type=float, default=None, help='mixup alpha (0.8; 0 = off); Mixup/CutMix need an even --batch_size')
    a('--cutmix', type=float, default=None, help='cutmix alpha (1.0; 0 = off)')
    a('--smoothing', type=float, default=0.1, help='label smoothing (inside Mixup when it is on)')
    a('--train_fraction', type=float, default=None, help='low-shot: fine-tune on this class-stratified fraction '
      'of train/ (0.01, 0.1), chosen from --seed alone')
    a('--subset_file', default='', help="low-shot with SimCLR's 1percent.txt / 10percent.txt (the paper's subsets)")
    a('--eval', action='store_true', help='only evaluate the fine-tuned --checkpoint on val/ (and --eval_path)')
    a('--eval_path', action='append', default=[], help='also report top-1 on this ImageNet-style folder whose '
      'classes are a subset of the training classes, e.g. ImageNet-A/-R (200 classes); repeatable')
    add_common_args(p)
    p.set_defaults(batch_size=None, accum_iter=None, epochs=None, warmup_epochs=None, blr=None, min_lr=1e-6,
                   builtin_size=None, num_workers=None, save_freq=10, output_dir='./output/finetune')
    return p


if __name__ == '__main__':
    run(main, get_args_parser())
