"""Frozen-encoder evaluation of any checkpoint: linear probe ([cls] / mean / Selective Aggregation) and k-NN.

The encoder never trains: it is frozen, in eval mode, and only a pooling + BatchNorm + Linear head
learns on top of it (MAE's linear-probe protocol). Without augmentation the features are computed once and cached, so
an epoch of head training costs a pass over a tensor instead of a pass through the ViT.

    python probe.py --checkpoint output/mae_mff_laptop/checkpoint-last.pth           # built-in data, [cls]
    python probe.py --checkpoint ... --pool abmilp                                    # Selective Aggregation
    python probe.py --checkpoint ... --knn                                            # k-NN, no training
    torchrun --nproc_per_node=8 probe.py --checkpoint mae_pretrain_vit_base.pth --data_path /imagenet \\
        --batch_size 2048 --aug                                                       # the MAE recipe

Sections: pooling heads -> features/cache -> k-NN -> training loop -> CLI.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import Lars
from torchvision import transforms

from common import (IMAGENET_MEAN, IMAGENET_STD, InputError, NonFiniteLossError, autocast, build_dataset,
                    eval_transform, init_distributed, load_encoder, log_epoch, lr_at, make_loader, progress, run,
                    seed_epoch, set_lr, wrap_ddp)


# ----------------------------------------------------------------------------------------------
# Pooling heads.

class AbMILPool(nn.Module):
    """Selective Aggregation (Przewiezlikowski et al., ICCV 2025): attention-based MIL pooling.

    s_i = MLP(h_i), a = softmax_i(s), z = sum_i a_i h_i over the patch tokens only: the [cls] token of
    MIM models attends almost uniformly, which is what this replaces. depth 0 = their released
    single Linear(D, 1); each extra level adds Linear(D, D) + tanh/relu before it.
    """

    def __init__(self, dim, depth=0, act='tanh'):
        super().__init__()
        hidden = [m for _ in range(depth) for m in (nn.Linear(dim, dim), nn.Tanh() if act == 'tanh' else nn.ReLU())]
        self.score = nn.Sequential(*hidden, nn.Linear(dim, 1))

    def attention(self, patches):                                        # (N, L, D) -> a (N, L), sums to 1
        return self.score(patches).squeeze(-1).softmax(dim=-1)

    def forward(self, patches):                                          # (N, L, D) -> z (N, D)
        return torch.einsum('nl,nld->nd', self.attention(patches), patches)


class ProbeHead(nn.Module):
    """[pool] -> BatchNorm1d(affine=False, eps 1e-6) -> Linear(trunc_normal std 0.01): the MAE probe head.

    cls/mean pooling has no parameters, so it happens during feature extraction and the head sees
    (N, D); abmilp learns, so the head sees the patch tokens (N, L, D).
    """

    def __init__(self, dim, num_classes, pool='cls', abmilp_depth=0, abmilp_act='tanh'):
        super().__init__()
        self.pool = AbMILPool(dim, abmilp_depth, abmilp_act) if pool == 'abmilp' else nn.Identity()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)           # whitens features of any scale
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(self.bn(self.pool(x)))


# ----------------------------------------------------------------------------------------------
# Features and the cache.

def features(encoder, imgs, pool, layer):
    """Frozen forward -> the head's input: (N, D) for cls/mean, patch tokens (N, L, D) for abmilp.

    The final norm is applied after whichever block is probed, as MAE's probe reads norm(x)[:, 0].
    """
    x = encoder.norm(encoder.forward_blocks(encoder.embed(imgs), [layer % encoder.depth])[-1])  # (N, 1 + L, D)
    return x[:, 0] if pool == 'cls' else x[:, 1:].mean(1) if pool == 'mean' else x[:, 1:]


def free_memory(device):
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


@torch.no_grad()
def extract(encoder, loader, pool, layer, device, rank=0):
    """One pass over this rank's shard -> (features, labels) on `device`, preallocated after a memory check."""
    n = len(loader.sampler)
    shape = (encoder.num_patches, encoder.cls_token.shape[-1]) if pool == 'abmilp' else (encoder.cls_token.shape[-1],)
    dtype = torch.bfloat16 if device.type == 'cuda' and pool == 'abmilp' else torch.float32   # tokens are big
    need, free = n * math.prod(shape) * dtype.itemsize, free_memory(device)
    if need > 0.8 * free:
        raise InputError(f'the {pool} feature cache needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB is free: '
                         'use --pool cls or mean, fewer images, or --aug to re-encode every batch instead')
    feats, labels = torch.empty((n, *shape), dtype=dtype, device=device), torch.empty(n, dtype=torch.long, device=device)
    i = 0
    for imgs, y in progress(loader, rank, desc='extracting features'):
        with autocast(device):
            f = features(encoder, imgs.to(device, non_blocking=True), pool, layer)
        feats[i:i + len(y)], labels[i:i + len(y)] = f, y
        i += len(y)
    return feats, labels


def batches(encoder, source, args, device, shuffle):
    """Yield (head input float32, labels) from a cache (features, labels) or by encoding a loader's batches."""
    if isinstance(source, tuple):
        x, y = source
        order = torch.randperm(len(y), device=device) if shuffle else torch.arange(len(y), device=device)
        bs = args.batch_size
        for i in range(len(y) // bs if shuffle else math.ceil(len(y) / bs)):  # training drops the ragged tail
            idx = order[i * bs:(i + 1) * bs]
            yield x[idx].float(), y[idx]
        return
    for imgs, y in source:
        with torch.no_grad(), autocast(device):
            f = features(encoder, imgs.to(device, non_blocking=True), args.pool, args.layer)
        yield f.float(), y.to(device, non_blocking=True)


def gather(x, world_size):
    """All ranks' shards concatenated (DistributedSampler pads shards to equal length)."""
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def topk_hits(scores, y, num_classes):
    """-> tensor [top-1 hits, top-5 hits (0 when < 5 classes), count]."""
    top = scores.topk(min(5, num_classes), dim=1).indices                # (N, k)
    hit = top == y[:, None]
    return torch.stack([hit[:, 0].sum(), hit.any(1).sum() if num_classes >= 5 else hit[:, 0].sum() * 0,
                        torch.tensor(len(y), device=y.device)]).double()


def accuracy(hits, world_size, num_classes):
    if world_size > 1:
        dist.all_reduce(hits)
    top1, top5, n = hits.tolist()
    return 100 * top1 / n, (100 * top5 / n if num_classes >= 5 else None)


# ----------------------------------------------------------------------------------------------
# k-NN (DINO, Caron et al. 2021): no training, a health check usable during pre-training.

@torch.no_grad()
def knn_scores(train_x, train_y, test_x, num_classes, k=20, t=0.07, chunk=256):
    """Cosine-similarity k-NN; each of the k nearest votes for its class with weight exp(sim / t). -> (M, C)."""
    train_x, test_x = F.normalize(train_x.float(), dim=1), F.normalize(test_x.float(), dim=1)
    out = []
    for q in test_x.split(chunk):
        sim, idx = (q @ train_x.T).topk(min(k, len(train_x)), dim=1)     # (B, k) each
        votes = torch.zeros(len(q), num_classes, device=q.device)
        out.append(votes.scatter_add_(1, train_y[idx], (sim / t).exp()))
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# Training loop.

def lars(head, args):
    """LARS as in MAE: trust ratio on matrices even with wd 0 (always_adapt); 1-D params exempt from both."""
    mats = [p for p in head.parameters() if p.ndim > 1]
    vecs = [p for p in head.parameters() if p.ndim <= 1]
    return Lars([{'params': mats, 'weight_decay': args.weight_decay, 'always_adapt': True},
                 {'params': vecs, 'weight_decay': 0., 'always_adapt': False}],
                lr=args.lr, momentum=0.9, trust_coeff=0.001)


def train_probe(encoder, train_src, val_src, num_classes, args, device, rank=0, world_size=1):
    """Train the head for args.epochs; evaluate after each. -> (head, per-epoch history)."""
    torch.manual_seed(args.seed)                                         # same head init on every rank
    head = ProbeHead(encoder.cls_token.shape[-1], num_classes, args.pool, args.abmilp_depth, args.abmilp_act).to(device)
    model = wrap_ddp(head, device, world_size)                           # cached shards: DDP-averaged grads
    optimizer = lars(head, args)
    cached = isinstance(train_src, tuple)
    steps = len(train_src[1]) // args.batch_size if cached else len(train_src)
    if steps == 0:
        raise InputError(f'{len(train_src[1])} training images per process, fewer than --batch_size '
                         f'{args.batch_size}: lower --batch_size or add data')
    history = []
    for epoch in range(args.epochs):
        seed_epoch(args.seed, epoch, rank)
        if not cached:
            train_src.sampler.set_epoch(epoch)
        head.train()
        start, loss_sum = time.time(), torch.zeros((), device=device)
        for i, (x, y) in enumerate(progress(batches(encoder, train_src, args, device, True), rank,
                                            total=steps, desc=f'epoch {epoch}')):
            set_lr(optimizer, lr_at(epoch + i / steps, args))            # per-iteration warmup + cosine
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
        loss = float(loss_sum) / steps                                   # one host sync per epoch
        if not math.isfinite(loss):
            raise NonFiniteLossError(f'non-finite probe loss in epoch {epoch}: lower --blr')
        seconds = time.time() - start
        top1, top5 = evaluate(head, encoder, val_src, num_classes, args, device, world_size)
        stats = {'epoch': epoch + 1, 'loss': round(loss, 4), 'lr': optimizer.param_groups[0]['lr'],
                 'top1': round(top1, 2), 'top5': top5 and round(top5, 2), 'epoch_s': round(seconds, 3)}
        history.append(stats)
        log_epoch(args, rank, stats)
    return head, history


@torch.no_grad()
def evaluate(head, encoder, val_src, num_classes, args, device, world_size):
    head.eval()
    hits = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in batches(encoder, val_src, args, device, False):
        hits += topk_hits(head(x), y, num_classes)
    return accuracy(hits, world_size, num_classes)


# ----------------------------------------------------------------------------------------------
# Command line.

def probe_train_transform(size):
    """MAE main_linprobe: RandomResizedCrop (torchvision's default scale 0.08-1, bicubic) + flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def resolve_defaults(args):
    """Built-in data (no --data_path) gets a quick setting: cached features, 30 epochs, blr 30."""
    builtin = not args.data_path
    pick = lambda v, folder, small: v if v is not None else (small if builtin else folder)  # noqa: E731
    args.epochs = pick(args.epochs, 90, 30)
    args.warmup_epochs = pick(args.warmup_epochs, 10, 3)
    args.blr = pick(args.blr, 0.1, 30.)        # few steps at small scale: LARS needs a large lr
    args.num_workers = pick(args.num_workers, 10, 0)
    args.aug = pick(args.aug, True, False) and not args.knn
    args.lr = args.lr if args.lr is not None else args.blr * args.batch_size * args.world_size / 256
    if args.knn and args.pool == 'abmilp':
        raise InputError('k-NN has no training, so it cannot learn abmilp attention: use --knn with --pool cls or mean')


def main(args):
    rank, world_size, device = init_distributed()
    args.world_size = world_size
    resolve_defaults(args)
    encoder = load_encoder(args.checkpoint, args).to(device)
    if not -encoder.depth <= args.layer < encoder.depth:
        raise InputError(f'--layer {args.layer} does not exist in a {encoder.depth}-block encoder: '
                         f'use 0..{encoder.depth - 1}, or -1 for the last')
    args.layer %= encoder.depth
    args.input_size = encoder.patch_embed.img_size[0]                   # the size it was pre-trained at
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
    train_set = build_dataset(args, 'train', probe_train_transform(args.input_size) if args.aug
                              else eval_transform(args.input_size))
    val_set = build_dataset(args, 'val', eval_transform(args.input_size))
    num_classes = len(train_set.classes)
    loader = lambda ds, train: make_loader(ds, args.batch_size, rank, world_size, args.num_workers,  # noqa: E731
                                           train=train, seed=args.seed)[0]
    start = time.time()
    val_src = extract(encoder, loader(val_set, False), args.pool, args.layer, device, rank) if not args.aug \
        else loader(val_set, False)
    train_src = loader(train_set, True) if args.aug else \
        extract(encoder, loader(train_set, False), args.pool, args.layer, device, rank)
    if rank == 0:
        print(f'{args.checkpoint}: ViT D={encoder.cls_token.shape[-1]} depth={encoder.depth} at {args.input_size}px, block '
              f'{args.layer}, pool {args.pool}, {len(train_set)} train / {len(val_set)} val images, {num_classes} '
              f'classes, {"re-encoding each batch" if args.aug else f"cached in {time.time() - start:.1f}s"}'
              + ('' if args.knn else f', lr {args.lr:.3g}'), flush=True)
    result = {'checkpoint': args.checkpoint, 'pool': args.pool, 'layer': args.layer, 'num_classes': num_classes,
              'data': args.data_path or f'builtin:{args.builtin_label}', 'args': vars(args)}
    if args.knn:
        hits = topk_hits(knn_scores(gather(train_src[0], world_size), gather(train_src[1], world_size),
                                    val_src[0], num_classes, args.knn_k, args.knn_t), val_src[1], num_classes)
        top1, top5 = accuracy(hits, world_size, num_classes)
        result.update(method='knn', top1=top1, top5=top5)
        name = f'knn_{args.pool}_block{args.layer}.json'
    else:
        _, history = train_probe(encoder, train_src, val_src, num_classes, args, device, rank, world_size)
        result.update(method='linear', epochs=history, best_top1=max(h['top1'] for h in history),
                      top1=history[-1]['top1'], top5=history[-1]['top5'])
        name = f'probe_{args.pool}_block{args.layer}.json'
    if rank == 0:
        print(f"{result['method']} {args.pool}: top-1 {result['top1']:.2f}"
              + (f" (best {result['best_top1']:.2f})" if 'best_top1' in result else '')
              + (f", top-5 {result['top5']:.2f}" if result['top5'] is not None else ''), flush=True)
        with open(os.path.join(args.output_dir, name), 'w') as f:
            json.dump(result, f, indent=1)
    return result


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    a = p.add_argument
    a('--checkpoint', required=True, help='our pre-training checkpoint, an official MAE .pth or a timm ViT state dict')
    a('--model', default='', help='only a check: the architecture is read from the checkpoint')
    a('--input_size', type=int, default=None, help='only a check; the pre-training size is used')
    a('--patch_size', type=int, default=None, help='only a check')
    a('--num_heads', type=int, default=None, help='needed only for timm/official weights of a non-standard width')
    a('--pool', default='cls', choices=['cls', 'mean', 'abmilp'],
      help='cls: [cls] after the final norm (MAE); mean: average patch token (I-JEPA, BootMAE); '
           'abmilp: Selective Aggregation, learned attention over patches (best for MIM encoders)')
    a('--abmilp_depth', type=int, default=0, help='hidden Linear(D, D) layers in the abmilp scorer; 0 = paper release')
    a('--abmilp_act', default='tanh', choices=['tanh', 'relu'], help='activation of the hidden scorer layers')
    a('--layer', type=int, default=-1, help='block whose output is probed (0-based; -1 = last). Shallow blocks '
      'of MIM encoders often probe better than the last on low-level tasks')
    a('--knn', action='store_true', help='k-NN instead of a trained head: seconds, a health check during pre-training')
    a('--knn_k', type=int, default=20)
    a('--knn_t', type=float, default=0.07, help='vote weight exp(similarity / t)')
    a('--aug', dest='aug', action='store_const', const=True, default=None,
      help='re-encode every batch with RandomResizedCrop + flip (the MAE recipe; default with --data_path)')
    a('--no_aug', dest='aug', action='store_const', const=False,
      help='encode once and train on cached features, >= 10x faster (default for built-in data and k-NN)')
    a('--batch_size', type=int, default=256,
      help='per process; the MAE recipe uses 16384 in all (the cached path copes on 1 GPU)')
    a('--epochs', type=int, default=None, help='default 90 (MAE; PiLaMIM uses 100), 30 on built-in data')
    a('--warmup_epochs', type=int, default=None, help='default 10, 3 on built-in data')
    a('--blr', type=float, default=None, help='base lr x batch / 256; default 0.1 (PiLaMIM uses 3), 30 on built-in data')
    a('--lr', type=float, default=None, help='absolute lr; overrides --blr')
    a('--min_lr', type=float, default=0.)
    a('--weight_decay', type=float, default=0.)
    a('--data_path', default='', help='ImageNet-style root with train/ and val/; empty = built-in shapes')
    a('--builtin_size', type=int, default=4096, help='built-in training images (val: a quarter, at least 256)')
    a('--builtin_label', default='shape', choices=['shape', 'count'],
      help='shape: semantic task; count: low-level task (objects 1-4). Chance is 25%% for both')
    a('--num_workers', type=int, default=None, help='loader processes; default 10, 0 on built-in data')
    a('--output_dir', default='./output/probe', help='log.jsonl and the JSON result file go here')
    a('--seed', type=int, default=0)
    return p


if __name__ == '__main__':
    run(main, get_args_parser())
