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

--data times the input pipeline instead, one process, side by side: CPU ms per image of a loader
worker for the old float path, the uint8 paths (full decode; JPEG draft mode + box resize) and
the CPU share of --gpu_decode, on JPEGs it generates at ImageNet's typical sizes, and the cores per
GPU each needs to feed --gpu_images_per_s. It also prints how far each path's pixels are from the
full decode, and with --gpu_decode the device-side decode rate.

    python bench.py --data                                 # 200 JPEGs, 224 px, rrc and simple crops
    python bench.py --data --gpu_decode                    # + batched decode on the GPU (CUDA)
"""
import argparse
import contextlib
import io
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.flop_counter import FlopCounterMode

import finetune
import probe
from common import (VIT_SIZES, ImageView, ViTEncoder, adamw, autocast, collate, load_rgb, make_loader, open_with_bytes,
                    parse_args, to_device, train_transform)
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


# ----------------------------------------------------------------------------------------------
# Input pipeline (--data).

def natural_jpeg(path, seed, size):
    """A JPEG (quality 90) with the statistics that matter to a decoder: smooth multi-scale noise, a
    colour gradient, a few sharp-edged shapes and fine grain (not flat colour, which compresses away)."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((4, 90), (16, 45), (64, 20)):                     # 1/f-like: coarse blobs, then detail
        noise = Image.fromarray(rng.uniform(0, 255, (cells * h // w + 1, cells, 3)).astype(np.uint8))
        img += (np.asarray(noise.resize((w, h), Image.BICUBIC), np.float32) - 128) * amp / 128
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    img += (rng.uniform(60, 200, 3) * (1 - x[..., None]) + rng.uniform(60, 200, 3) * y[..., None]) / 1.5
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))
    draw = ImageDraw.Draw(pil)
    for _ in range(6):
        x0, y0 = rng.integers(0, w - w // 10), rng.integers(0, h - h // 10)
        box = (x0, y0, x0 + rng.integers(w // 20, w // 3), y0 + rng.integers(h // 20, h // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    grain = rng.normal(0, 6, (h, w, 3))
    pil = Image.fromarray(np.clip(np.asarray(pil, np.float32) + grain, 0, 255).astype(np.uint8))
    pil.save(path, quality=90)


def make_jpegs(folder, n):
    """n JPEGs, half 500x375 and half 375x500 (ImageNet's typical sizes); -> their paths."""
    paths = []
    for i in range(n):
        paths.append(os.path.join(folder, f'{i:04d}.jpg'))
        natural_jpeg(paths[-1], i, (500, 375) if i % 2 == 0 else (375, 500))
    return paths


def data_paths(crop, size):
    """name -> a loader worker's work for one file: read/decode, crop, resize, flip, to a tensor."""
    views = {mode: ImageView(crop, size, mode) for mode in ('exact', 'draft', 'gpu')}
    old = train_transform(size, crop)                                    # PIL -> float, normalised in the worker
    return {
        'old path (PIL, float in the worker)': lambda p: old(load_rgb(p)),
        'uint8, full decode (--exact_decode)': lambda p: views['exact'](load_rgb(p)),
        'uint8, draft mode + crop-box resize (default)': lambda p: views['draft'](open_with_bytes(p)),
        '--gpu_decode, CPU share (bytes + crop draw)': lambda p: views['gpu'](open_with_bytes(p)),
    }


def cpu_ms_per_image(work, paths, batch=32):
    """CPU time (process_time, this process only) per image of `work` + collating batches of `batch`."""
    start = time.process_time()
    for k in range(0, len(paths), batch):
        collate([(work(p), 0) for p in paths[k:k + batch]])
    return 1000 * (time.process_time() - start) / len(paths)


def pixel_distance(crop, size, paths):
    """Mean |difference| to the full decode (--exact_decode), same draws, in 0-255 pixel levels, of the
    draft path (split by whether draft mode reduced the decode) and of --gpu_decode's device code run
    with the CPU decoder -> {name: (mean, images)}."""
    exact, draft, gpu = (ImageView(crop, size, m) for m in ('exact', 'draft', 'gpu'))
    diffs = {'draft, full-size decode': [], 'draft, reduced decode': [], 'gpu path (CPU decoder)': []}
    for k, p in enumerate(paths):
        torch.manual_seed(k)
        ref = exact(load_rgb(p)).float()
        torch.manual_seed(k)
        img = Image.open(p)
        w = img.size[0]
        reduced = img.draft('RGB', draft.draft_need(*img.size, draft.draw(*img.size)[0]))
        torch.manual_seed(k)
        name = 'draft, reduced decode' if reduced and reduced[1][2] < w else 'draft, full-size decode'
        diffs[name].append((draft(open_with_bytes(p)).float() - ref).abs().mean().item())
        torch.manual_seed(k)
        batch, _ = collate([(gpu(open_with_bytes(p)), 0)])
        diffs['gpu path (CPU decoder)'].append((batch.decode(torch.device('cpu'))[0].float() - ref).abs().mean().item())
    return {k: (statistics.mean(v) if v else float('nan'), len(v)) for k, v in diffs.items()}


def device_decode_rate(crop, size, paths, device, batch=128, rounds=3):
    """Images/s of EncodedBatch.decode + normalisation on `device` (batched decode_jpeg, crops there)."""
    view = ImageView(crop, size, 'gpu')
    items = [(view(open_with_bytes(p)), 0) for p in (paths * (batch // len(paths) + 1))[:batch]]
    times = []
    for _ in range(rounds + 1):                                          # the first round warms up
        encoded, _ = collate(items)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        to_device(encoded, device)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times[1:])


def bench_data(args):
    torch.set_num_threads(1)                                             # a loader worker is one thread
    with tempfile.TemporaryDirectory() as folder:
        paths = make_jpegs(folder, args.images)
        kb = statistics.mean(os.path.getsize(p) for p in paths) / 1024
        print(f'{args.images} generated JPEGs (500x375 / 375x500, quality 90, mean {kb:.0f} KB), {args.input_size} px '
              f'view, one process, CPU time per image incl. collate; cores per GPU for {args.gpu_images_per_s:g} '
              f'images/s; torch {torch.__version__}', flush=True)
        for crop in ('rrc', 'simple'):
            work = data_paths(crop, args.input_size)
            times = {name: [] for name in work}
            for r in range(args.rounds):                                # interleaved: same cache, same load
                for name, fn in (list(work.items()) if r % 2 == 0 else reversed(list(work.items()))):
                    torch.manual_seed(r)
                    times[name].append(cpu_ms_per_image(fn, paths))
            base = None
            for name, t in times.items():
                ms = statistics.median(t)
                base = base or ms
                print(f'  {crop:6s} {name:44s} {ms:6.2f} ms/img  {1000 / ms:6.0f} img/s/core  {ms / base:5.2f}x old  '
                      f'{args.gpu_images_per_s * ms / 1000:5.1f} cores/GPU', flush=True)
            for size in (args.input_size, args.input_size // 2):        # half size: draft mode reduces often
                dist = pixel_distance(crop, size, paths)
                print(f'  {crop:6s} at {size} px, mean |pixel - full decode| in 0-255 levels (images): ' +
                      ', '.join(f'{k} {v:.3f} ({n})' for k, (v, n) in dist.items()), flush=True)
            if crop == 'rrc':                                           # finetune.py keeps timm's float pipeline
                recipe = argparse.Namespace(input_size=args.input_size, crop_min=0.08, aa='rand-m9-mstd0.5-inc1',
                                            reprob=0.25)
                timm_view = finetune.train_transform(recipe)
                torch.manual_seed(0)
                ms = statistics.median(cpu_ms_per_image(lambda p: timm_view(load_rgb(p)), paths)
                                       for _ in range(args.rounds))
                print(f'  {crop:6s} {"finetune.py (timm RandAugment + erasing, float)":44s} {ms:6.2f} ms/img  '
                      f'{1000 / ms:6.0f} img/s/core  {ms / base:5.2f}x old  '
                      f'{args.gpu_images_per_s * ms / 1000:5.1f} cores/GPU', flush=True)
            if args.gpu_decode:
                device = torch.device(args.device)
                rate = device_decode_rate(crop, args.input_size, paths, device)
                print(f'  {crop:6s} --gpu_decode on {device.type}: {rate:.0f} images/s (batched decode_jpeg, '
                      'crop, resize, flip, normalise; batch 128)', flush=True)


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
    p.add_argument('--data', action='store_true', help='time the input pipeline per CPU core instead (see above)')
    p.add_argument('--images', type=int, default=200, help='--data: JPEGs generated (and timed per round)')
    p.add_argument('--rounds', type=int, default=3, help='--data: timed passes per path (median reported)')
    p.add_argument('--gpu_images_per_s', type=float, default=6700,
                   help='--data: training speed to feed, for cores per GPU (6700: ViT-B MAE at 40%% MFU on an H100)')
    p.add_argument('--gpu_decode', action='store_true', help='--data: also time the decode on --device')
    args = p.parse_args()
    if args.data:
        return bench_data(args)
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
