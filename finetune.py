"""End-to-end fine-tuning of a pre-trained ViT (MAE's protocol), low-shot fine-tuning and robustness evaluation.

The whole encoder trains, with a fresh head on the average of the patch tokens; the recipe is MAE's
(FINETUNE.md: layer-wise lr decay, RandAugment, Mixup/CutMix, drop path), NOT the official script's
argparse defaults. The model is timm's VisionTransformer(global_pool='avg'), so the fine-tuned weights
load into timm unchanged.

    python finetune.py --preset laptop --checkpoint output/mae_mff_laptop/checkpoint-last.pth   # built-in data
    torchrun --nproc_per_node=8 finetune.py --checkpoint mae_pretrain_vit_base.pth --data_path /imagenet \\
        --batch_size 32 --accum_iter 4                                               # ViT-B: 83.6 from MAE 1600 ep
    python finetune.py --eval --checkpoint output/finetune/checkpoint-last.pth --data_path /imagenet \\
        --eval_path /imagenet-r                                                      # evaluation only

Argparse defaults are the recipe; epochs, blr, layer decay and drop path follow the encoder's depth
(RECIPES, filled in by resolve_recipe); `--preset laptop` is a few CPU minutes on the built-in data.

Sections: model -> loss/mixup -> data (low-shot subsets, evaluation sets) -> loop -> CLI.
"""
import argparse
import json
import os
from functools import partial

import torch
import torch.nn as nn
from PIL import Image
from timm.data import Mixup, auto_augment, create_transform
from timm.layers import resample_abs_pos_embed
from timm.loss import SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from torchvision import datasets

from common import (IMAGENET_MEAN, IMAGENET_STD, VIT_SIZES, InputError, LossTracker, accuracy, add_builtin_eval_args,
                    add_common_args, autocast, build_dataset, compile_model, init_distributed, load_matching_state, load_rgb,
                    log_epoch, lr_at, make_loader, make_output_dir, no_sync_unless, progress, read_encoder,
                    remove_stale_temp_files, resume, resume_path, run, save_training_state, scale_lr, seed_epoch,
                    set_lr, size_of, start_log, to_device, topk_hits, wrap_ddp)

SCRIPT = os.path.basename(__file__)                  # recorded in its checkpoints (resume checks it)

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
                              global_pool='token' if cls_token else 'avg',
                              norm_layer=partial(nn.LayerNorm, eps=arch.get('norm_eps', 1e-6)))
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

def train_one_epoch(model, loader, optimizer, mixup, criterion, device, epoch, step, tracker, args):
    """One pass over this rank's shard; returns (global optimizer step, mean loss).
    tracker: the run's LossTracker (rank, world size, and the checkpoint a NaN message names)."""
    model.train()
    tracker.start()
    micro_steps = len(loader) // args.accum_iter * args.accum_iter      # drop a ragged accumulation tail
    bar = progress(loader, tracker.rank, total=micro_steps, desc=f'epoch {epoch}')
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
            tracker.check()
            bar.set_postfix(loss=f"{tracker.mean(1)['loss']:.4f}", lr=f"{optimizer.param_groups[-1]['lr']:.2e}")
    tracker.check()
    return step, tracker.mean()['loss']


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


def resolve_recipe(args, arch):
    """The start-up resolution, in one place: epochs, blr, layer decay and drop path from the RECIPES row
    of the encoder's depth, unless flags or --preset gave them (fine_tune prints them)."""
    row = RECIPES['huge' if arch['depth'] >= 32 else 'large' if arch['depth'] >= 24 else 'base']
    for k, v in row.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def encoder_and_arch(args):
    """-> (encoder state dict or None, architecture, whole checkpoint or {}). With --checkpoint the architecture
    is read from its weights (--input_size: the checkpoint's unless given); without, the supervised baseline
    from --model (default vit_base_patch16) at --input_size (default 224)."""
    if args.model and size_of(args.model)[0] is None:
        raise InputError(f"--model '{args.model}' names no ViT size: use e.g. vit_base_patch16, or omit it")
    if args.checkpoint:
        state, arch, ckpt, found = read_encoder(args.checkpoint, args, check_input_size=False)
    else:
        size, patch = size_of(args.model or 'vit_base_patch16')
        state, ckpt, found = None, {}, 'from scratch (supervised baseline, no --checkpoint)'
        arch = dict(VIT_SIZES[size], patch_size=args.patch_size or patch, mlp_ratio=4., img_size=224,
                    num_heads=args.num_heads or VIT_SIZES[size]['num_heads'])
    args.input_size = args.input_size or arch['img_size']
    arch['img_size'] = args.input_size
    return state, arch, ckpt, found


def classifier(args, state, arch, ckpt, classes):
    """-> (timm classifier, pool). --eval: the fine-tuned checkpoint, loaded whole; else a fresh head on the
    pre-trained encoder (or on random weights without --checkpoint)."""
    full = ckpt.get('model', ckpt) if isinstance(ckpt.get('model', ckpt), dict) else {}
    if args.eval:
        if 'head.weight' not in full:
            raise InputError(f'--eval needs a fine-tuned checkpoint with a classifier head; {args.checkpoint or "none"} '
                             'has none: fine-tune it first (drop --eval)')
        if ckpt.get('classes', classes) != classes or full['head.weight'].shape[0] != len(classes):
            raise InputError(f'{args.checkpoint} was fine-tuned on other classes ({full["head.weight"].shape[0]}) '
                             f'than val/ of {args.data_path or "the built-in data"} holds ({len(classes)}): pass '
                             'the --data_path it was fine-tuned on')
    cls_token = 'fc_norm.weight' not in full if args.eval else args.cls_token
    torch.manual_seed(args.seed)                                         # same init on every rank
    model = vit_classifier(arch, len(classes), args.drop_path, cls_token,
                           qkv_bias=state is None or 'blocks.0.attn.qkv.bias' in state)
    if args.eval:
        load_matching_state(model, full, args.checkpoint)                # strict
    elif state is not None:
        load_pretrained(model, state, args.checkpoint, cls_token)
    return model, 'cls' if cls_token else 'avg'


def fine_tune(args, raw_model, arch, pool, val_set, val_loader, rank, world_size, device):
    """Set-up in order (data -> optimizer -> resume -> compile/DDP), then the epochs, each evaluated on val/
    and checkpointed. -> (results to report, last top-1, last top-5)."""
    classes = val_set.classes
    train_set = build_dataset(args, 'train', train_transform(args))
    if train_set.classes != classes:
        raise InputError(f'train/ and val/ of {args.data_path} hold different classes: give both the same '
                         'class folders')
    train_set, (lo, hi) = low_shot(train_set, args)
    mixup, criterion = mixup_and_loss(args, len(classes))
    loader, sampler = make_loader(train_set, args.batch_size, rank, world_size, args.num_workers, seed=args.seed,
                                  accum_iter=args.accum_iter)
    eff_batch = scale_lr(args, world_size)
    optimizer = layer_decay_optimizer(raw_model, args, device)
    start_epoch, step, resumed = resume(args, raw_model, optimizer, SCRIPT)  # before compile/DDP wrap it
    best = resumed.get('best_top1', 0.) if resumed else 0.
    model = wrap_ddp(compile_model(raw_model) if args.compile else raw_model, device, world_size)
    if rank == 0:
        remove_stale_temp_files(args.output_dir)
        start_log(args, start_epoch if resumed else None)
        print(f"{args.checkpoint or 'from scratch (supervised baseline, no --checkpoint)'}: ViT D={arch['embed_dim']} "
              f"depth={arch['depth']} patch {arch['patch_size']} at {args.input_size}px, {pool} pool, "
              f'{len(train_set)} train images ({lo}-{hi} per class) / {len(val_set)} val, {len(classes)} classes, '
              f'effective batch {eff_batch}, lr {args.lr:.3g}, layer decay {args.layer_decay}, drop path '
              f'{args.drop_path}, {args.epochs} epochs, from epoch {start_epoch}', flush=True)
    tracker = LossTracker(device, rank, world_size, checkpoint=resume_path(args))
    for epoch in range(start_epoch, args.epochs):                        # resume() refuses a finished run
        seed_epoch(args.seed, epoch, rank)                               # RNGs and data order from (seed, epoch)
        sampler.set_epoch(epoch)
        step, loss = train_one_epoch(model, loader, optimizer, mixup, criterion, device, epoch, step, tracker, args)
        stats = {'epoch': epoch + 1, 'step': step, 'loss': loss, 'lr': optimizer.param_groups[-1]['lr']}
        if (epoch + 1) % args.eval_freq == 0 or epoch + 1 == args.epochs:  # the last epoch always: the result
            top1, top5 = evaluate(raw_model, val_loader, device, world_size, len(classes))
            best = max(best, top1)
            stats.update(top1=round(top1, 2), top5=top5 and round(top5, 2))
        tracker.checkpoint = save_training_state(args, raw_model, optimizer, epoch + 1, step, rank, SCRIPT,
                                                 best_top1=best, classes=classes)
        log_epoch(args, rank, stats)
    return dict(train_images=len(train_set), images_per_class=[lo, hi], best_top1=round(best, 2)), top1, top5


def main(args):
    """Fine-tune (with --eval: only evaluate), then report top-1 on val/ and on every --eval_path."""
    if not args.eval_freq >= 1:
        raise InputError(f'--eval_freq {args.eval_freq} < 1: evaluate every N >= 1 epochs (the last one always)')
    rank, world_size, device = init_distributed()
    make_output_dir(args.output_dir)
    state, arch, ckpt, found = encoder_and_arch(args)
    if rank == 0 and args.checkpoint:
        print(f'{args.checkpoint}: {found}', flush=True)                 # what the file is, in one line
    resolve_recipe(args, arch)
    val_set = build_dataset(args, 'val', eval_transform(args.input_size))
    num_classes = len(val_set.classes)
    raw_model, pool = classifier(args, state, arch, ckpt, val_set.classes)
    raw_model.to(device)
    val_loader = make_loader(val_set, args.batch_size, rank, world_size, args.num_workers, train=False)[0]
    extra_sets = eval_sets(args, val_set.classes)
    result = {'checkpoint': args.checkpoint or None, 'data': args.data_path or f'builtin:{args.builtin_label}',
              'num_classes': num_classes, 'pool': pool}
    if args.eval:
        top1, top5 = evaluate(raw_model, val_loader, device, world_size, num_classes)
    else:
        trained, top1, top5 = fine_tune(args, raw_model, arch, pool, val_set, val_loader, rank, world_size, device)
        result.update(trained)
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
        'accum 4 per GPU (x 8 GPUs = 1024), RandAugment, erasing 0.25, Mixup 0.8 / CutMix 1.0. --preset laptop '
        '(built-in data, a few CPU minutes): 1024 images, 5 epochs, 1 warmup, blr 1e-2, layer decay 0.9, batch 32, '
        'crops >= 0.35, no RandAugment/erasing/Mixup/CutMix, no loader workers. Explicit flags win.'))
    a = p.add_argument
    a('--preset', choices=sorted(PRESETS), help='laptop: built-in data on a CPU, a few minutes (see below)')
    a('--checkpoint', default='', help='pre-training checkpoint (ours, official MAE, timm state dict, timm:NAME, '
      'OpenMMLab MAE / MFF / PixMIM, PiLaMIM public code); none = '
      'train from scratch, the supervised baseline. With --eval: a fine-tuned checkpoint')
    a('--model', default='', help='from scratch: the ViT, e.g. vit_base_patch16 (default) or vit_tiny_patch4 for '
      'the built-in data; with --checkpoint only a check (the architecture is read from the weights)')
    a('--input_size', type=int, default=None, help="default: the checkpoint's (224 from scratch); another size "
      'resizes the position embedding (bicubic)')
    a('--patch_size', type=int, default=None, help='from scratch: overrides the name; else only a check')
    a('--num_heads', type=int, default=None, help='needed only for weights of a non-standard width')
    a('--cls_token', action='store_true', help='classify the [cls] token after the final norm instead of the '
      'average patch token + fc_norm (MAE default)')
    a('--layer_decay', type=float, default=None, help='layer-wise lr decay (0.65 ViT-B, 0.75 ViT-L/H)')
    a('--drop_path', type=float, default=None, help='stochastic depth rate (0.1 ViT-B, 0.2 ViT-L, 0.3 ViT-H)')
    a('--clip_grad', type=float, default=None, help='clip the gradient norm (off in the MAE recipe; try 1.0 if '
      'the loss spikes)')
    a('--crop_min', type=float, default=0.08, help='smallest RandomResizedCrop area (0.35 in --preset laptop: '
      'the built-in 32 px images hold 1-4 small objects a smaller crop often misses)')
    a('--aa', default='rand-m9-mstd0.5-inc1', help="timm RandAugment policy; '' = off")
    a('--reprob', type=float, default=0.25, help='random erasing probability (pixel mode, one box)')
    a('--mixup', type=float, default=0.8, help='mixup alpha (0 = off); Mixup/CutMix need an even --batch_size')
    a('--cutmix', type=float, default=1.0, help='cutmix alpha (0 = off)')
    a('--smoothing', type=float, default=0.1, help='label smoothing (inside Mixup when it is on)')
    a('--train_fraction', type=float, default=None, help='low-shot: fine-tune on this class-stratified fraction '
      'of train/ (0.01, 0.1), chosen from --seed alone')
    a('--subset_file', default='', help="low-shot with SimCLR's 1percent.txt / 10percent.txt (the paper's subsets)")
    a('--eval_freq', type=int, default=1, help='evaluate on val/ every N epochs and after the last (MAE: every '
      'epoch); where evaluation costs more than the training epoch, as on a low-shot subset, raise it')
    a('--eval', action='store_true', help='only evaluate the fine-tuned --checkpoint on val/ (and --eval_path)')
    a('--eval_path', action='append', default=[], help='also report top-1 on this ImageNet-style folder whose '
      'classes are a subset of the training classes, e.g. ImageNet-A/-R (200 classes); repeatable')
    add_common_args(p)
    add_builtin_eval_args(p)
    # MAE's recipe; epochs and blr (None) come from the RECIPES row of the encoder's depth (resolve_recipe).
    p.set_defaults(batch_size=32, accum_iter=4, epochs=None, warmup_epochs=5, blr=None, min_lr=1e-6,
                   num_workers=10, save_freq=10, output_dir='./output/finetune')
    return p


# A few hundred steps on 32 px shapes: a larger lr, less layer decay, no RandAugment/erasing/Mixup, larger crops.
PRESETS = {'laptop': dict(epochs=5, warmup_epochs=1, blr=1e-2, layer_decay=0.9, batch_size=32, accum_iter=1,
                          num_workers=0, builtin_size=1024, crop_min=0.35, aa='', reprob=0., mixup=0., cutmix=0.)}

if __name__ == '__main__':
    run(main, get_args_parser(), PRESETS)
