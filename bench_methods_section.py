"""Step time of MAE, PixMIM (with its low-pass filter) and PiLaMIM (with its EMA update).

A full training step each: forward, backward, AdamW step (and PiLaMIM's target update), timed
after warm-up, under the same bf16 autocast the training scripts use on CUDA. The MFF switch is
left off for all three so the ratios show the method's own cost (MFF adds the same to each).

    python bench_methods_section.py --device cuda --size base --input_size 224 --batch 128
    python bench_methods_section.py --device cpu --size base --input_size 64 --batch 8 --steps 3
"""
import argparse
import statistics
import time

import torch

from common import VIT_SIZES, adamw, autocast
from mae_mff import MaskedAutoencoder
from pilamim import PiLaMIM, momentum_at
from pixmim_mff import pixmim_loss


def bench_methods(device, size='base', batch=128, steps=20, input_size=224, patch_size=16, warmup=3):
    """Print and return {method: ms/step} for MAE, PixMIM and PiLaMIM at ViT-`size`."""
    device = torch.device(device)
    vit = dict(img_size=input_size, patch_size=patch_size, **VIT_SIZES[size])
    mae_dec = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, norm_pix_loss=True)
    radius = 40. * input_size / 224
    opt_args = argparse.Namespace(weight_decay=0.05, lr=1e-4)

    def mae_step(model, imgs):
        with autocast(device):
            return model(imgs, 0.75)[0]

    def pixmim_step(model, imgs):
        return pixmim_loss(model, imgs, 0.75, radius)                    # filter + MAE/MFF forward

    def pilamim_step(model, imgs):
        with autocast(device):
            return model(imgs, 0.75)[0]

    methods = {'mae': (lambda: MaskedAutoencoder(**vit, **mae_dec), mae_step),
               'pixmim': (lambda: MaskedAutoencoder(**vit, **mae_dec), pixmim_step),
               'pilamim': (lambda: PiLaMIM(**vit), pilamim_step)}
    imgs = torch.randn(batch, 3, input_size, input_size, device=device)
    results = {}
    for name, (make, loss_fn) in methods.items():
        torch.manual_seed(0)
        model = make().to(device).train()
        optimizer = adamw(model, opt_args, device)
        times = []
        for i in range(warmup + steps):
            if device.type == 'cuda':
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss_fn(model, imgs).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if name == 'pilamim':
                model.update_target(momentum_at(i, warmup + steps))
            if device.type == 'cuda':
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
        results[name] = 1000 * statistics.median(times)
        del model, optimizer
        if device.type == 'cuda':
            torch.cuda.empty_cache()
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f'ViT-{size}/{patch_size} at {input_size} px, batch {batch}, median of {steps} steps after {warmup} '
          f'warm-up, {where}:')
    for name, ms in results.items():
        print(f'  {name:8s} {ms:9.1f} ms/step   {ms / results["mae"]:.3f} x MAE')
    return results


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--size', default='base', choices=sorted(VIT_SIZES))
    p.add_argument('--input_size', type=int, default=224)
    p.add_argument('--patch_size', type=int, default=16)
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--warmup', type=int, default=3)
    a = p.parse_args()
    if a.device == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bench_methods(a.device, a.size, a.batch, a.steps, a.input_size, a.patch_size, a.warmup)
