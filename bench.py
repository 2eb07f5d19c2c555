"""Benchmark of one training step (forward, backward, optimizer; after warm-up) per method.

Prints ms/step, images/s, the ratio to MAE, peak GPU memory and, on CUDA, model FLOPs
utilisation (MFU) against the device's dense bf16 peak. MFF-MAE vs MAE shows the cost of the
fusion (target: <= 3% at ViT-B); PixMIM adds the low-pass filter (<= 5%); PiLaMIM adds the
target-encoder forward and its EMA update (<= 1.6x).

    python bench.py                                        # ViT-B/16, 224 px, batch 128 on CUDA
    python bench.py --device cpu --input_size 64 --batch 8 --steps 5
"""
import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import VIT_SIZES, adamw, autocast
from mae_mff import MaskedAutoencoder, paper_mff_layers
from pilamim import PiLaMIM, momentum_at
from pixmim_mff import pixmim_loss

# Dense bf16 tensor-core peaks (FLOP/s), matched against torch.cuda.get_device_name.
BF16_PEAK = {'H200': 989e12, 'H100 PCIe': 756e12, 'H100': 989e12, 'A100': 312e12, 'L40S': 362e12,
             'A10G': 70e12, '4090': 165e12}


def peak_flops(device):
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None), name


def methods(size, input_size, patch_size):
    """name -> (model factory, loss function(model, imgs), after-step hook)."""
    depth = VIT_SIZES[size]['depth']
    vit = dict(img_size=input_size, patch_size=patch_size, **VIT_SIZES[size])
    mae = dict(vit, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, norm_pix_loss=True)
    radius = 40. * input_size / 224

    def plain_loss(model, imgs):
        with autocast(imgs.device):
            return model(imgs, 0.75)[0]

    return {
        'mae': (lambda: MaskedAutoencoder(**mae), plain_loss, None),
        'mff_mae': (lambda: MaskedAutoencoder(**mae, mff_layers=paper_mff_layers(depth)), plain_loss, None),
        'pixmim': (lambda: MaskedAutoencoder(**mae), lambda m, x: pixmim_loss(m, x, 0.75, radius), None),
        'pilamim': (lambda: PiLaMIM(**vit), plain_loss, lambda m, i, n: m.update_target(momentum_at(i, n))),
    }


def bench_step(make, loss_fn, after_step, device, imgs, steps, warmup, compile_model):
    """-> (median seconds per step, FLOPs per step, peak memory in GiB or None)."""
    torch.manual_seed(0)
    raw = make().to(device).train()
    model = torch.compile(raw) if compile_model else raw
    optimizer = adamw(raw, argparse.Namespace(weight_decay=0.05, lr=1e-4), device)

    def step(i):
        loss_fn(model, imgs).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(raw, i, warmup + steps)

    with FlopCounterMode(display=False) as counter:                      # counted on the eager model
        loss_fn(raw, imgs).backward()
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(i)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    memory = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else None
    return statistics.median(times), flops, memory


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--size', default='base', choices=sorted(VIT_SIZES))
    p.add_argument('--input_size', type=int, default=224)
    p.add_argument('--patch_size', type=int, default=16)
    p.add_argument('--batch', type=int, default=128, help='images per step (one GPU)')
    p.add_argument('--steps', type=int, default=20, help='timed steps (median reported)')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps first (compile, allocator, cudnn)')
    p.add_argument('--methods', nargs='+', default=['mae', 'mff_mae', 'pixmim', 'pilamim'])
    p.add_argument('--compile', action='store_true', help='torch.compile each model first')
    args = p.parse_args()
    device = torch.device(args.device)
    peak, where = (peak_flops(device) if device.type == 'cuda'
                   else (None, f'CPU ({torch.get_num_threads()} threads)'))
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
    print(f'{where}, torch {torch.__version__}, ViT-{args.size}/{args.patch_size} at {args.input_size} px, '
          f'batch {args.batch}, median of {args.steps} steps after {args.warmup} warm-up'
          f'{", compiled" if args.compile else ""}')
    imgs = torch.randn(args.batch, 3, args.input_size, args.input_size, device=device)
    table = methods(args.size, args.input_size, args.patch_size)
    base = None
    for name in args.methods:
        seconds, flops, memory = bench_step(*table[name], device, imgs, args.steps, args.warmup, args.compile)
        base = base or seconds
        line = (f'  {name:8s} {1000 * seconds:9.1f} ms/step  {args.batch / seconds:8.1f} img/s  '
                f'{seconds / base:5.3f}x {args.methods[0]}  {flops / args.batch / 1e9:6.1f} GFLOP/img')
        if memory is not None:
            line += f'  peak {memory:5.1f} GiB'
        if peak:
            line += f'  MFU {100 * flops / seconds / peak:5.1f}%'
        print(line, flush=True)
        if device.type == 'cuda':
            torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
