"""Benchmark of one training step (forward, backward, optimizer; after warm-up) per method.

Prints ms/step, images/s, the ratio to MAE, peak GPU memory and, on CUDA, model FLOPs
utilisation (MFU) against the device's dense bf16 peak. MFF-MAE vs MAE shows the cost of the
fusion (target: <= 3% at ViT-B); PixMIM adds the low-pass filter (<= 5%); PiLaMIM adds the
target-encoder forward and its EMA update (<= 1.6x).

    python bench.py                                        # ViT-B/16, 224 px, batch 128 on CUDA
    python bench.py --device cpu --input_size 64 --batch 8 --steps 5
    python bench.py --probe --device cpu --size tiny --input_size 32 --patch_size 4 --batch 64 --steps 4

--probe times probe.py's fast path instead: an epoch of head training on cached features vs
re-encoding every batch through the frozen ViT (target: >= 10x).
"""
import argparse
import contextlib
import io
import statistics
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import probe
from common import VIT_SIZES, ViTEncoder, adamw, autocast, make_loader, parse_args
from mae_mff import MaskedAutoencoder, paper_mff_layers
from pilamim import PiLaMIM, momentum_at
from pixmim_mff import PixMIM

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
        'pixmim': (lambda: PixMIM(lpf_radius=radius, **mae), plain_loss, None),
        'pilamim': (lambda: PiLaMIM(**vit), plain_loss, lambda m, i, n: m.update_target(momentum_at(i, n))),
    }


def bench_step(make, loss_fn, after_step, device, imgs, steps, warmup, compile_model):
    """-> (median seconds per step, FLOPs per step, peak memory in GiB or None)."""
    torch.manual_seed(0)
    raw = make().to(device).train()
    model = torch.compile(raw) if compile_model else raw
    optimizer = adamw(raw, argparse.Namespace(weight_decay=0.05, wd_rule='mmpretrain', lr=1e-4), device)

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


def bench_probe_cache(device, steps, size='tiny', img_size=32, patch_size=4, batch_size=64, pools=('cls', 'abmilp')):
    """Print one line: ms per epoch of `steps` batches, cached vs re-encoding, per pooling; return the figures."""
    device = torch.device(device)
    torch.manual_seed(0)
    encoder = ViTEncoder(img_size, patch_size, **VIT_SIZES[size]).to(device).requires_grad_(False).eval()
    imgs = torch.randn(batch_size, 3, img_size, img_size, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)
    figures = {}
    for pool in pools:
        with torch.no_grad(), autocast(device):
            feats = probe.features(encoder, imgs, pool, encoder.depth - 1, pool != 'abmilp').float()
        cache = (feats.repeat(steps, *[1] * (feats.ndim - 1)), labels.repeat(steps))   # steps x batch entries
        val = (feats[:1], labels[:1])
        with tempfile.TemporaryDirectory() as out:
            args = parse_args(probe.get_args_parser(), probe.PRESETS, ['--preset', 'laptop', '--checkpoint', 'x',
                                                                        '--pool', pool, '--epochs', '2', '--batch_size',
                                                                        str(batch_size), '--output_dir', out])
            args.world_size = 1
            probe.resolve_recipe(args)
            times = {}
            images = torch.utils.data.TensorDataset(imgs.cpu().repeat(steps, 1, 1, 1), labels.cpu().repeat(steps))
            loader = make_loader(images, batch_size, 0, 1, 0, train=True)[0]   # in-memory images, shuffled
            for name, source in (('cached', cache), ('re-encoding', loader)):
                with contextlib.redirect_stdout(io.StringIO()):
                    _, history = probe.train_probe(encoder, source, val, 10, args, device)
                times[name] = history[-1]['epoch_s'] * 1000                  # second epoch: warm
        figures[pool] = times
    line = ', '.join(f"{pool}: cached {t['cached']:.1f} ms, re-encoding {t['re-encoding']:.0f} ms "
                     f"-> {t['re-encoding'] / t['cached']:.0f}x" for pool, t in figures.items())
    print(f'probe head epoch ({steps} steps x {batch_size}, ViT-{size}/{patch_size} at {img_size}px, {device.type}): '
          f'{line}', flush=True)
    return figures



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
    p.add_argument('--probe', action='store_true', help="time probe.py's cached vs re-encoding head epoch")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.probe:
        return bench_probe_cache(device, args.steps, args.size, args.input_size, args.patch_size, args.batch)
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
