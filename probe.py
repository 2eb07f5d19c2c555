"""Frozen-encoder evaluation of any checkpoint: linear probe ([cls] / mean / Selective Aggregation) and k-NN.

The encoder never trains: it is frozen, in eval mode, and only a pooling + BatchNorm + Linear head
learns on top of it (MAE's linear-probe protocol). Without augmentation the features are computed once and cached, so
an epoch of head training costs a pass over a tensor instead of a pass through the ViT.

    python probe.py --preset laptop --checkpoint output/mae_mff_laptop/checkpoint-last.pth   # built-in data, [cls]
    python probe.py --preset laptop --checkpoint ... --pool abmilp                          # Selective Aggregation
    python probe.py --preset laptop --checkpoint ... --knn                                  # k-NN, no training
    python probe.py --preset laptop --checkpoint ... --pool cls,mean --solver lbfgs         # one pass, two probes
    torchrun --nproc_per_node=8 probe.py --checkpoint mae_pretrain_vit_base.pth --data_path /imagenet
        # the MAE recipe by default: 2048 per GPU x accum_iter 1 x 8 GPUs = 16384, re-encoding (--aug)

Argparse defaults are that recipe; `--preset laptop` (built-in data, CPU) trains on cached features
for 30 epochs; resolve_recipe fills in what depends on the run (accum_iter, --feature_norm auto).

Sections: pooling heads -> features/cache -> k-NN -> logistic regression -> training loop -> CLI.
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

from common import (InputError, NonFiniteLossError, accuracy, add_builtin_eval_args, add_decode_args, autocast,
                    build_dataset, describe_decode, eval_view, init_distributed, load_encoder, log_epoch, lr_at, make_loader,
                    make_output_dir, no_sync_unless, progress, run, seed_epoch, set_lr, start_log, to_device, topk_hits,
                    train_view, warmup_note, wrap_ddp)


# ----------------------------------------------------------------------------------------------
# Pooling heads.

class AbMILPool(nn.Module):
    """Selective Aggregation (Przewiezlikowski et al., ICCV 2025): attention-based MIL pooling.

    s_i = MLP(h_i), a = softmax_i(s), z = sum_i a_i h_i over the patch tokens only: the [cls] token of
    MIM models attends almost uniformly, which is what this replaces. Depth as their --abmilp_depth:
    1 = their released single Linear(D, 1); depth d puts d - 1 Linear(D, D) + tanh/relu before it.
    PyTorch's default Linear init, as theirs.
    """

    def __init__(self, dim, depth=1, act='tanh'):
        super().__init__()
        if depth < 1:
            raise InputError(f'--abmilp_depth {depth} < 1: 1 is the single Linear(D, 1) scorer of the paper')
        hidden = [m for _ in range(depth - 1) for m in (nn.Linear(dim, dim), nn.Tanh() if act == 'tanh' else nn.ReLU())]
        self.score = nn.Sequential(*hidden, nn.Linear(dim, 1))

    def attention(self, patches):                                        # (N, L, D) -> a (N, L), sums to 1
        return self.score(patches).squeeze(-1).softmax(dim=-1)

    def forward(self, patches):                                          # (N, L, D) -> z (N, D)
        return torch.einsum('nl,nld->nd', self.attention(patches), patches)


class ProbeHead(nn.Module):
    """[pool] -> BatchNorm1d(affine=False, eps 1e-6) -> Linear: the MAE probe head.

    cls/mean pooling has no parameters, so it happens during feature extraction and the head sees
    (N, D); abmilp learns, so the head sees the patch tokens (N, L, D). The Linear is initialised
    as in each reference: trunc_normal(std 0.01) for cls/mean (MAE), PyTorch's default for abmilp
    (gmum/beyond_cls).
    """

    def __init__(self, dim, num_classes, pool='cls', abmilp_depth=1, abmilp_act='tanh'):
        super().__init__()
        self.pool = AbMILPool(dim, abmilp_depth, abmilp_act) if pool == 'abmilp' else nn.Identity()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)           # whitens features of any scale
        self.fc = nn.Linear(dim, num_classes)
        if pool != 'abmilp':
            nn.init.trunc_normal_(self.fc.weight, std=0.01)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(self.bn(self.pool(x)))


# ----------------------------------------------------------------------------------------------
# Features and the cache.

def features(encoder, imgs, pool, layer, norm):
    """Frozen forward -> the head's input: (N, D) for cls/mean, patch tokens (N, L, D) for abmilp."""
    return pooled(encoder, block_output(encoder, imgs, layer), pool, norm)


def block_output(encoder, imgs, layer):                                  # -> (N, 1 + L, D)
    return encoder.forward_blocks(encoder.embed(imgs), [layer % encoder.depth])[-1]


def pooled(encoder, x, pool, norm):
    """x, the raw residual stream after a block (N, 1 + L, D) -> one pool's features.

    norm=True applies the encoder's final LayerNorm (--feature_norm). cls: norm(x)[:, 0] as MAE's
    probe; mean: norm(mean of the patch tokens) as MAE's global pool (average first, then the norm);
    abmilp: the patch tokens, by default raw as gmum/beyond_cls (its forward_features never applies
    the final norm). Several pools share one x: one encoder pass for all of them.
    """
    x = x[:, 0] if pool == 'cls' else x[:, 1:].mean(1) if pool == 'mean' else x[:, 1:]
    return encoder.norm(x) if norm else x                                # LayerNorm is per token


def free_memory(device):
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


def extract(encoder, loader, pool, layer, norm, device, rank=0):
    """One pass over this rank's shard -> (features, labels) on `device`, preallocated after a memory check."""
    return extract_pools(encoder, loader, {pool: norm}, layer, device, rank)[pool]


@torch.no_grad()
def extract_pools(encoder, loader, norms, layer, device, rank=0):
    """One encoder pass, several pools: norms {pool: final norm on} -> {pool: (features, labels)}, labels shared."""
    n, dim = len(loader.sampler), encoder.cls_token.shape[-1]
    shapes = {pool: (encoder.num_patches, dim) if pool == 'abmilp' else (dim,) for pool in norms}
    dtypes = {pool: torch.bfloat16 if device.type == 'cuda' and pool == 'abmilp' else torch.float32  # tokens are big
              for pool in norms}
    need, free = sum(n * math.prod(shapes[p]) * dtypes[p].itemsize for p in norms), free_memory(device)
    if need > 0.8 * free:
        raise InputError(f'the {",".join(norms)} feature cache needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB '
                         'is free: use --pool cls or mean, fewer images, or --aug to re-encode every batch instead')
    labels = torch.empty(n, dtype=torch.long, device=device)
    feats = {p: torch.empty((n, *shapes[p]), dtype=dtypes[p], device=device) for p in norms}
    i = 0
    for imgs, y in progress(loader, rank, desc='extracting features'):
        with autocast(device):
            x = block_output(encoder, to_device(imgs, device), layer)
            for pool, norm in norms.items():
                feats[pool][i:i + len(y)] = pooled(encoder, x, pool, norm)
        labels[i:i + len(y)] = y
        i += len(y)
    return {pool: (f, labels) for pool, f in feats.items()}


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
            f = features(encoder, to_device(imgs, device), args.pool, args.layer, args.feature_norm == 'on')
        yield f.float(), y.to(device, non_blocking=True)


def gather(x, world_size):
    """All ranks' evaluation shards -> the whole split in dataset order, each image once.

    Rank r holds images r, r+W, ... (common.EvalShard), so shards differ in length by one at most:
    gather the lengths, pad to the longest for all_gather, then drop the padding.
    """
    if world_size == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    sizes = [int(n) for n in sizes]
    padded = torch.cat([x, x.new_zeros(max(sizes) - len(x), *x.shape[1:])])
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    out = x.new_empty(sum(sizes), *x.shape[1:])
    for r, (part, n) in enumerate(zip(parts, sizes)):
        out[r::world_size] = part[:n]
    return out


def top1_hit(scores, y, num_classes):                                    # (M, C) -> (M,) bool, topk_hits' top-1
    return scores.topk(min(5, num_classes), dim=1).indices[:, 0] == y


def top1_halves(hit, world_size):
    """This rank's per-image top-1 hits -> [top-1 % on the first half, on the second half] of the whole
    evaluation set in dataset order: two disjoint evaluation sets of one run, whose difference shows
    the evaluation noise (each half's top-1 has sqrt(2) x the standard error of the whole)."""
    hit = gather(hit.long(), world_size)                                 # (N,) every image once, in order
    h = len(hit) // 2
    return [100 * part.double().mean().item() if len(part) else None for part in (hit[:h], hit[h:])]


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
# Logistic regression (--solver lbfgs): the linear evaluation of CLIP and DINOv2, solved to convergence,
# so a result depends on the features alone: no lr, epochs, batch order or --seed.

LAMBDAS = [10. ** e for e in range(1, -7, -1)]  # L2 grid 1e1 .. 1e-6, one per decade, strongest first (warm starts)


def standardise(train_x, *others):
    """Every set by the training features' mean and std: what the SGD head's BatchNorm(affine=False) does."""
    mean, std = train_x.mean(0), (train_x.var(0, unbiased=False) + 1e-6).sqrt()
    return [(x - mean) / std for x in (train_x, *others)]


def objective(x, y, W, b, lam):
    return F.cross_entropy(x @ W + b, y) + lam / 2 * W.pow(2).sum()     # mean CE + L2 on W, the bias not decayed


def spectrum(x):
    """x (N, D) -> (eigenvalues E (D,), eigenvectors V (D, D)) of x^T x / N, for fit_logreg's preconditioner."""
    e, V = torch.linalg.eigh(x.T @ x / len(x))
    return e.clamp(min=0), V


def fit_logreg(x, y, num_classes, lam, init=None, eig=None, max_iter=1000):
    """Multinomial logistic regression, x (N, D) float64 -> (W (D, C), b (C,)) at the minimum of `objective`.

    L-BFGS with strong-Wolfe line search; one step() iterates until the gradient or the change vanishes.
    It runs in the coordinates W = P W', P = V (E + lam)^-1/2 (eig = spectrum(x)): x W = (x P) W' and
    ||W||^2 = sum_i ||W'_i||^2 / (E_i + lam), so the objective and its minimum are the same, but the
    curvature, of condition ~ max(E) / lam in W (features of a LayerNorm are nearly rank-deficient),
    is close to uniform in W': tens of iterations instead of thousands at small lambda.
    init: (W, b) of a neighbouring lambda to start from (fewer iterations; the minimum is the same).
    """
    e, V = spectrum(x) if eig is None else eig
    P, penalty = V * (e + lam).rsqrt(), 1 / (e + lam)                 # (D, D), (D,)
    xp = x @ P
    Wp = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, device=x.device) if init is None else \
        (e + lam).sqrt()[:, None] * (V.T @ init[0])                   # P^-1 W
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device) if init is None else init[1].clone()
    Wp.requires_grad_(True), b.requires_grad_(True)
    opt = torch.optim.LBFGS([Wp, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,   # float64
                            tolerance_change=1e-10, line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xp @ Wp + b, y) + lam / 2 * (penalty[:, None] * Wp.pow(2)).sum()   # = objective
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return (P @ Wp).detach(), b.detach()


def logreg_probe(train_src, val_src, num_classes, world_size=1):
    """Cached features -> the result fields of the lbfgs probe.

    lambda: the best top-1 on a held-out 20% of the training features (a fixed split, not --seed),
    ties to the stronger; then a refit on all of them is evaluated on val. Every rank gathers the
    training features and solves the same problem; val stays sharded, as for the SGD head.
    """
    x, y = gather(train_src[0], world_size).double(), gather(train_src[1], world_size)
    if len(y) < 10:
        raise InputError(f'{len(y)} training images: --solver lbfgs holds out 20% to choose lambda, '
                         'give at least 10')
    x, val_x = standardise(x, val_src[0].double())
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0)).to(y.device)
    held, fit = order[:len(y) // 5], order[len(y) // 5:]
    solutions, heldout, eig, previous = {}, {}, spectrum(x[fit]), None
    for lam in LAMBDAS:                                                  # each starts from the one before
        W, b = previous = solutions[lam] = fit_logreg(x[fit], y[fit], num_classes, lam, previous, eig)
        heldout[lam] = 100 * ((x[held] @ W + b).argmax(1) == y[held]).double().mean().item()
    best = max(LAMBDAS, key=lambda lam: (heldout[lam], lam))
    W, b = fit_logreg(x, y, num_classes, best, solutions[best])
    scores = val_x @ W + b
    top1, top5 = accuracy(topk_hits(scores, val_src[1], num_classes), world_size, num_classes)
    return {'solver': 'lbfgs', 'top1': top1, 'top5': top5,
            'top1_halves': top1_halves(top1_hit(scores, val_src[1], num_classes), world_size),
            'lambda': best, 'train_objective': objective(x, y, W, b, best).item(),
            'heldout_top1': {f'{lam:g}': acc for lam, acc in heldout.items()}}  # per lambda, on 20% of train


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
    micro = len(train_src[1]) // args.batch_size if cached else len(train_src)
    if cached and world_size > 1:                # unpadded shards may differ by one image: same steps on all ranks
        micro_t = torch.tensor(micro, device=device)
        dist.all_reduce(micro_t, op=dist.ReduceOp.MIN)
        micro = int(micro_t)
    steps = micro // args.accum_iter * args.accum_iter                   # drop a ragged accumulation tail
    if steps == 0:
        raise InputError(f'{micro * args.batch_size} training images per process, fewer than --batch_size '
                         f'{args.batch_size} x --accum_iter {args.accum_iter}: lower them or add data')
    history = []
    for epoch in range(args.epochs):
        seed_epoch(args.seed, epoch, rank)
        if not cached:
            train_src.sampler.set_epoch(epoch)
        head.train()
        start, loss_sum = time.time(), torch.zeros((), device=device)
        for i, (x, y) in enumerate(progress(batches(encoder, train_src, args, device, True), rank,
                                            total=steps, desc=f'epoch {epoch}')):
            if i == steps:
                break
            if i % args.accum_iter == 0:                                 # a new accumulation window
                set_lr(optimizer, lr_at(epoch + i / steps, args))        # per-iteration warmup + cosine
                optimizer.zero_grad(set_to_none=True)
            last_micro = (i + 1) % args.accum_iter == 0
            with no_sync_unless(model, last_micro):
                loss = F.cross_entropy(model(x), y)
                (loss / args.accum_iter).backward()
            if last_micro:
                optimizer.step()
            loss_sum += loss.detach()
        if world_size > 1:                       # a NaN on any rank stops all of them; the global mean is logged
            dist.all_reduce(loss_sum)
        loss = float(loss_sum) / (steps * world_size)                    # one host sync per epoch
        if not math.isfinite(loss):
            raise NonFiniteLossError(f'non-finite probe loss in epoch {epoch}: lower --blr')
        seconds = time.time() - start
        top1, top5, halves = evaluate(head, encoder, val_src, num_classes, args, device, world_size)
        stats = {'epoch': epoch + 1, 'pool': args.pool, 'loss': round(loss, 4), 'lr': optimizer.param_groups[0]['lr'],
                 'top1': round(top1, 2), 'top5': top5 and round(top5, 2),
                 'top1_halves': [h if h is None else round(h, 2) for h in halves], 'epoch_s': round(seconds, 3)}
        history.append(stats)
        log_epoch(args, rank, stats)
    return head, history


@torch.no_grad()
def evaluate(head, encoder, val_src, num_classes, args, device, world_size):
    """-> (top-1 %, top-5 % or None, top1_halves) over every rank's evaluation shard."""
    head.eval()
    hits, hit = torch.zeros(3, dtype=torch.float64, device=device), [torch.zeros(0, dtype=torch.bool, device=device)]
    for x, y in batches(encoder, val_src, args, device, False):
        scores = head(x)
        hits += topk_hits(scores, y, num_classes)
        hit.append(top1_hit(scores, y, num_classes))
    return (*accuracy(hits, world_size, num_classes), top1_halves(torch.cat(hit), world_size))


# ----------------------------------------------------------------------------------------------
# Command line.

RECIPE_BATCH = 16384                           # effective batch of every reference probe (SPEC s.5)
POOLS = ('cls', 'mean', 'abmilp')


def resolved_norm(pool, feature_norm):
    """--feature_norm auto: MAE's post-norm features for cls/mean, the raw residual stream for abmilp."""
    return ('off' if pool == 'abmilp' else 'on') if feature_norm == 'auto' else feature_norm


def pool_args(args, pool):
    """One pool's flags of a several-pool run: exactly what `--pool POOL` alone would have resolved to."""
    return argparse.Namespace(**{**vars(args), 'pool': pool, 'feature_norm': resolved_norm(pool, args.feature_norm)})


def resolve_recipe(args):
    """The start-up resolution, in one place (main prints the outcome). accum_iter: the recipe's effective
    batch 16384 = batch_size x accum_iter x GPUs (8 on one GPU at 2048, 1 on 8). --feature_norm auto:
    MAE's post-norm features for cls/mean, the raw residual stream for abmilp (resolved here for one
    pool, by pool_args for several). k-NN never augments."""
    if args.batch_size < 1:
        raise InputError(f'--batch_size {args.batch_size} < 1: give at least 1 image per process')
    if args.accum_iter is None:
        args.accum_iter = max(1, round(RECIPE_BATCH / (args.batch_size * args.world_size)))
    if args.accum_iter < 1:
        raise InputError(f'--accum_iter {args.accum_iter} < 1: give at least 1')
    if not args.knn_k >= 1:
        raise InputError(f'--knn_k {args.knn_k} < 1: pass at least 1')
    if not args.knn_t > 0:                                               # NaN fails this too
        raise InputError(f'--knn_t {args.knn_t} must be positive: votes are weighted by exp(similarity / t)')
    args.aug = args.aug and not args.knn
    args.eff_batch = args.batch_size * args.accum_iter * args.world_size
    args.lr = args.lr if args.lr is not None else args.blr * args.eff_batch / 256
    pools = [p.strip() for p in args.pool.split(',')]
    for pool in pools:
        if pool not in POOLS:
            raise InputError(f"--pool {args.pool}: unknown pooling '{pool}': use cls, mean or abmilp, or a comma "
                             'list of them (e.g. cls,abmilp) for one encoder pass')
        if pools.count(pool) > 1:
            raise InputError(f'--pool {args.pool} names {pool} twice: list each pooling once')
    args.pool = ','.join(pools)
    if len(pools) == 1:
        args.feature_norm = resolved_norm(args.pool, args.feature_norm)
    if args.knn and 'abmilp' in pools:
        raise InputError('k-NN has no training, so it cannot learn abmilp attention: use --knn with --pool cls or mean')
    if args.aug and len(pools) > 1:
        raise InputError(f'--aug re-encodes every batch for one head, so --pool {args.pool} would encode each '
                         'batch once per pool: use one pool per run, or --no_aug (one pass, cached features)')
    if args.solver == 'lbfgs' and not args.knn and 'abmilp' in pools:
        raise InputError('--solver lbfgs fits a linear model on fixed features, and the abmilp attention pool has '
                         'to be trained by SGD: use --solver sgd for abmilp, lbfgs for cls / mean')
    if args.solver == 'lbfgs' and args.aug:
        raise InputError('--solver lbfgs solves on cached features, and --aug re-encodes every batch: add --no_aug')


def main(args):
    rank, world_size, device = init_distributed()
    args.world_size = world_size
    resolve_recipe(args)
    encoder, found = load_encoder(args.checkpoint, args)
    encoder.to(device)
    if not -encoder.depth <= args.layer < encoder.depth:
        raise InputError(f'--layer {args.layer} does not exist in a {encoder.depth}-block encoder: '
                         f'use 0..{encoder.depth - 1}, or -1 for the last')
    args.layer %= encoder.depth
    args.input_size = encoder.patch_embed.img_size[0]                   # the size it was pre-trained at
    sgd = not args.knn and args.solver == 'sgd'
    if not args.data_path and sgd and args.eff_batch > args.builtin_size:
        raise InputError(f'the built-in data has {args.builtin_size} training images, fewer than the effective batch '
                         f'{args.eff_batch} of the ImageNet recipe: add --preset laptop (the built-in setting), or pass '
                         '--data_path, or lower --batch_size / --accum_iter')
    make_output_dir(args.output_dir)
    if rank == 0:
        start_log(args)                                                  # log.jsonl: this run only
    # MAE main_linprobe: RandomResizedCrop (torchvision's default scale 0.08-1, bicubic) + flip
    train_set = build_dataset(args, 'train', train_view(args, 'rrc', scale=(0.08, 1.)) if args.aug else eval_view(args))
    val_set = build_dataset(args, 'val', eval_view(args))
    num_classes = len(train_set.classes)
    loader = lambda ds, train: make_loader(ds, args.batch_size, rank, world_size, args.num_workers,  # noqa: E731
                                           train=train, seed=args.seed, accum_iter=args.accum_iter)[0]
    start = time.time()
    runs = {pool: pool_args(args, pool) for pool in args.pool.split(',')}   # each pool's own resolved flags
    if args.aug:                                                         # one pool (resolve_recipe)
        val_src, train_src = {args.pool: loader(val_set, False)}, {args.pool: loader(train_set, True)}
    else:                                                                # one encoder pass for every pool
        norms = {pool: a.feature_norm == 'on' for pool, a in runs.items()}
        val_src = extract_pools(encoder, loader(val_set, False), norms, args.layer, device, rank)
        train_src = extract_pools(encoder, loader(train_set, False), norms, args.layer, device, rank)
    if rank == 0:
        print(f'{args.checkpoint} ({found}): ViT D={encoder.cls_token.shape[-1]} depth={encoder.depth} at {args.input_size}px, block '
              f'{args.layer}, pool {args.pool}, final norm {"/".join(a.feature_norm for a in runs.values())}, '
              f'{len(train_set)} train / {len(val_set)} val images'
              + (f' (built-in seed {args.builtin_seed})' if not args.data_path and args.builtin_seed is not None else '')
              + f', {num_classes} classes, {describe_decode(args)}, '
              f'{"re-encoding each batch" if args.aug else f"cached in {time.time() - start:.1f}s"}'
              + (f', effective batch {args.eff_batch} ({args.batch_size} x {args.accum_iter} accum_iter x {world_size} '
                 f'processes), lr {args.lr:.3g}{warmup_note(args)}' if sgd else '')
              + (f', L-BFGS logistic regression, L2 lambda {LAMBDAS[0]:g}..{LAMBDAS[-1]:g} chosen on 20% of train'
                 if not args.knn and not sgd else ''), flush=True)
    results = {pool: probe_one(encoder, train_src[pool], val_src[pool], num_classes, a, device, rank, world_size)
               for pool, a in runs.items()}
    return results[args.pool] if len(results) == 1 else results


def probe_one(encoder, train_src, val_src, num_classes, args, device, rank, world_size):
    """One pool's k-NN / linear probe on its features -> the result dict, written by rank 0."""
    result = {'checkpoint': args.checkpoint, 'pool': args.pool, 'layer': args.layer, 'num_classes': num_classes,
              'data': args.data_path or f'builtin:{args.builtin_label}', 'args': vars(args)}
    if args.knn:
        scores = knn_scores(gather(train_src[0], world_size), gather(train_src[1], world_size), val_src[0],
                            num_classes, args.knn_k, args.knn_t)
        top1, top5 = accuracy(topk_hits(scores, val_src[1], num_classes), world_size, num_classes)
        halves = top1_halves(top1_hit(scores, val_src[1], num_classes), world_size)
        result.update(method='knn', top1=top1, top5=top5, top1_halves=halves)
        name = f'knn_{args.pool}_block{args.layer}.json'
    elif args.solver == 'lbfgs':
        result.update(method='linear', **logreg_probe(train_src, val_src, num_classes, world_size))
        name = f'probe_{args.pool}_block{args.layer}.json'
    else:
        _, history = train_probe(encoder, train_src, val_src, num_classes, args, device, rank, world_size)
        result.update(method='linear', solver='sgd', epochs=history, best_top1=max(h['top1'] for h in history),
                      top1=history[-1]['top1'], top5=history[-1]['top5'], top1_halves=history[-1]['top1_halves'])
        name = f'probe_{args.pool}_block{args.layer}.json'
    if rank == 0:
        print(f"{result['method']} {args.pool}: top-1 {result['top1']:.2f}"
              + (f" (best {result['best_top1']:.2f})" if 'best_top1' in result else '')
              + (f", top-5 {result['top5']:.2f}" if result['top5'] is not None else '')
              + ', halves ' + ' / '.join(f'{h:.2f}' for h in result['top1_halves'] if h is not None)
              + (f", lambda {result['lambda']:g}" if 'lambda' in result else ''), flush=True)
        with open(os.path.join(args.output_dir, name), 'w') as f:
            json.dump(result, f, indent=1)
    return result


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    a = p.add_argument
    a('--preset', choices=sorted(PRESETS), help='laptop: built-in data on a CPU: cached features, batch 256, '
      '30 epochs, blr 30 (few steps at small scale: LARS needs a large lr)')
    a('--checkpoint', required=True,
      help='our pre-training or finetune.py checkpoint, an official MAE .pth, a timm ViT state dict, timm:NAME '
           '(a timm hub ViT), an OpenMMLab MAE / MFF / PixMIM file or a PiLaMIM public-code state dict')
    a('--model', default='', help='only a check: the architecture is read from the checkpoint')
    a('--input_size', type=int, default=None, help='only a check; the pre-training size is used')
    a('--patch_size', type=int, default=None, help='only a check')
    a('--num_heads', type=int, default=None, help='needed only for timm/official weights of a non-standard width')
    a('--pool', default='cls',
      help='cls: [cls] token (MAE); mean: norm(average patch token), MAE\'s global pool (I-JEPA, BootMAE); '
           'abmilp: Selective Aggregation, learned attention over patches (best for MIM encoders). A comma list '
           '(cls,mean,abmilp) encodes the data once and writes one result per pool (needs --no_aug)')
    a('--feature_norm', default='auto', choices=['auto', 'on', 'off'],
      help="apply the encoder's final LayerNorm to the probed features. auto: on for cls/mean (MAE's probe), "
           "off for abmilp (Beyond [cls] reads the raw residual stream of the last block), per pool; on/off: "
           "every pool")
    a('--solver', default='sgd', choices=['sgd', 'lbfgs'],
      help='sgd: the MAE recipe (LARS, epochs, lr). lbfgs: multinomial logistic regression solved to convergence '
           '(CLIP, DINOv2) on standardised cached features, L2 lambda from 1e1, 1e0, ..., 1e-6 by the top-1 on a '
           'fixed 20%% of the training features, then refit on all: no lr or epochs to tune and the same result '
           'for every --seed, so differences between checkpoints are not probe noise. cls/mean with --no_aug')
    a('--abmilp_depth', type=int, default=1,
      help='abmilp scorer depth as in gmum/beyond_cls: 1 = their single Linear(D, 1); d adds d - 1 hidden Linear(D, D)')
    a('--abmilp_act', default='tanh', choices=['tanh', 'relu'], help='activation of the hidden scorer layers')
    a('--layer', type=int, default=-1, help='block whose output is probed (0-based; -1 = last). Shallow blocks '
      'of MIM encoders often probe better than the last on low-level tasks')
    a('--knn', action='store_true', help='k-NN instead of a trained head: seconds, a health check during pre-training')
    a('--knn_k', type=int, default=20)
    a('--knn_t', type=float, default=0.07, help='vote weight exp(similarity / t)')
    a('--aug', dest='aug', action='store_const', const=True, default=True,
      help='re-encode every batch with RandomResizedCrop + flip (the MAE recipe, the default)')
    a('--no_aug', dest='aug', action='store_const', const=False,
      help='encode once and train on cached features, >= 10x faster (--preset laptop; k-NN always)')
    a('--batch_size', type=int, default=2048,
      help='per process (256 in --preset laptop). Effective batch = batch_size x accum_iter x GPUs; the recipe '
           '(MAE, Beyond [cls]) is 16384')
    a('--accum_iter', type=int, default=None,
      help='gradient accumulation steps; default 16384 / (batch_size x GPUs) (8 on one GPU, 1 on 8), so the '
           'recipe\'s effective batch 16384 is reached; 1 in --preset laptop')
    a('--epochs', type=int, default=90, help='90 (MAE; PiLaMIM uses 100), 30 in --preset laptop')
    a('--warmup_epochs', type=int, default=10, help='10, 3 in --preset laptop')
    a('--blr', type=float, default=0.1,
      help='lr = blr x effective batch / 256; 0.1 (MAE: lr 6.4 at 16384), 30 in --preset laptop '
           '(an abmilp probe there that ends near chance: try 10). '
           "PiLaMIM's probe: lr 3 at batch 1024 = blr 0.75")
    a('--lr', type=float, default=None, help='absolute lr; overrides --blr')
    a('--min_lr', type=float, default=0.)
    a('--weight_decay', type=float, default=0.)
    a('--data_path', default='', help='ImageNet-style root with train/ and val/; empty = built-in shapes')
    a('--builtin_size', type=int, default=4096, help='built-in training images (val: --builtin_val_size)')
    a('--builtin_label', default='shape', choices=['shape', 'count'],
      help='shape: semantic task; count: low-level task (objects 1-4). Chance is 25%% for both')
    a('--num_workers', type=int, default=10, help='loader processes (0 in --preset laptop)')
    a('--output_dir', default='./output/probe', help='log.jsonl and the JSON result file go here')
    a('--seed', type=int, default=0, help='head init and batch order; also the built-in images unless --builtin_seed')
    add_builtin_eval_args(p)
    add_decode_args(p)
    return p


# Built-in data on a CPU: encode once, train the head on the cache; everything else is the recipe.
PRESETS = {'laptop': dict(epochs=30, warmup_epochs=3, blr=30., num_workers=0, aug=False, batch_size=256,
                          accum_iter=1)}

if __name__ == '__main__':
    run(main, get_args_parser(), PRESETS)
