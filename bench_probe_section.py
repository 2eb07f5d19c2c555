"""Benchmark of probe.py's fast path: one epoch of head training on cached features vs re-encoding each batch.

Both sides run probe.train_probe itself (its 'epoch_s' is the training time of an epoch, evaluation
excluded); images are already decoded in memory, so the difference is the frozen ViT forward
(plus batch collation) alone.

    python bench_probe_section.py                      # CPU, ViT-tiny/4 at 32 px
"""
import argparse
import contextlib
import io
import sys
import tempfile

import torch

import probe
from common import VIT_SIZES, ViTEncoder, autocast, make_loader


def bench_probe(device, steps, size='tiny', img_size=32, patch_size=4, batch_size=64, pools=('cls', 'abmilp')):
    """Print one line: ms per epoch of `steps` batches, cached vs re-encoding, per pooling; return the figures."""
    device = torch.device(device)
    torch.manual_seed(0)
    encoder = ViTEncoder(img_size, patch_size, **VIT_SIZES[size]).to(device).requires_grad_(False).eval()
    imgs = torch.randn(batch_size, 3, img_size, img_size, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)
    figures = {}
    for pool in pools:
        with torch.no_grad(), autocast(device):
            feats = probe.features(encoder, imgs, pool, encoder.depth - 1).float()
        cache = (feats.repeat(steps, *[1] * (feats.ndim - 1)), labels.repeat(steps))   # steps x batch entries
        val = (feats[:1], labels[:1])
        with tempfile.TemporaryDirectory() as out:
            args = probe.get_args_parser().parse_args(['--checkpoint', 'x', '--pool', pool, '--epochs', '2',
                                                      '--batch_size', str(batch_size), '--output_dir', out])
            args.world_size = 1
            probe.resolve_defaults(args)
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


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--steps', type=int, default=4, help='batches per epoch')
    p.add_argument('--size', default='tiny', choices=sorted(VIT_SIZES))
    p.add_argument('--img_size', type=int, default=32)
    p.add_argument('--patch_size', type=int, default=4)
    p.add_argument('--batch_size', type=int, default=64)
    a = p.parse_args()
    bench_probe(a.device, a.steps, a.size, a.img_size, a.patch_size, a.batch_size)
    sys.exit(0)
