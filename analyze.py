"""Analysis of pre-trained checkpoints: the measurements behind the MFF and "Beyond [cls]" figures.

    python analyze.py frequency   --checkpoint A.pth [B.pth ...]       # MFF Figs. 2 and 4
    python analyze.py entropy     --checkpoint A.pth [B.pth ...]       # "Beyond [cls]" attention entropy
    python analyze.py hessian     --checkpoint A.pth [B.pth ...] --batches 8 --top_k 5   # MFF Fig. 5
    python analyze.py fusion      --log RUN/log.jsonl [RUN2/log.jsonl ...]             # MFF Figs. 1, 6, 8
    python analyze.py fusion      --checkpoint A.pth [B.pth ...]       # learned weights (released MFF too)
    python analyze.py reconstruct --checkpoint A.pth [B.pth ...]       # MAE-style reconstructions

Each command writes <output_dir>/<command>.json and a PNG figure (matplotlib is optional: without
it the JSON is still written). frequency and entropy read the encoder of any checkpoint format
common.read_checkpoint knows (ours, official MAE, timm, OpenMMLab, PiLaMIM's public code); hessian,
reconstruct and fusion --checkpoint rebuild the whole pre-training model and its loss from the
checkpoint's record: the `script` that wrote it (imported from this folder, so a new method's script
works without an edit here) and the `args` it trained with (or those the conversion of an OpenMMLab
pre-training file fills in), through the contract of common.py (get_args_parser, resolve_recipe,
build_model; forward -> (loss, pred, mask, ...), reconstruction_target). Images: the first
--num_images of the evaluation split in order (val/ of --data_path, or the built-in shapes) with the
evaluation transform, so every checkpoint sees the same images; hessian uses augmented training
batches, as Park & Kim advise.
"""
import argparse
import importlib.util
import itertools
import json
import math
import os
import re
import sys

import torch
from torch.utils.data import DataLoader, Subset
from torchvision.utils import make_grid, save_image

from common import (IMAGENET_MEAN, IMAGENET_STD, InputError, attention_entropy, autocast, build_dataset,
                    eval_transform, hessian_top_eigenvalues, load_encoder, load_matching_state, patchify, progress,
                    read_checkpoint, relative_log_amplitude, run, train_transform, unpatchify)

ROOT = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------
# Checkpoints, images, output files.


def labelled(paths, labels):
    """-> [(path, label)]; the default label is <run folder>/<file name>."""
    if labels and len(labels) != len(paths):
        raise InputError(f'{len(labels)} --labels for {len(paths)} inputs: give one label per input, or none')
    labels = labels or [os.path.join(os.path.basename(os.path.dirname(os.path.abspath(p))),
                                     os.path.splitext(os.path.basename(p))[0]) for p in paths]
    if len(set(labels)) < len(labels):
        raise InputError(f'two inputs share the label {max(labels, key=labels.count)}: name them with --labels')
    return list(zip(paths, labels))


def encoder_of(path, args):
    """Frozen encoder of any checkpoint; the architecture is read from its weights (probe.py's loader)."""
    encoder, found = load_encoder(path, argparse.Namespace(model=None, patch_size=None, input_size=None,
                                                          num_heads=args.num_heads))
    print(f'{path}: {found}')
    return encoder


def current_record(ckpt):
    """-> the checkpoint with the record the scripts write now. Official MAE (main_pretrain.py pickles its args
    as a Namespace, records no script) is mae_mff.py with --mff_layers none; ours from before --model names
    stated the patch (--model mae_vit_tiny_patch16 --patch_size 4) get the name mae_vit_tiny_patch4; pilamim.py's
    from before its decoders' cls position ((1, L, d) decoder_pos_embed) get a zero cls row, the same model."""
    if 'script' not in ckpt and isinstance(ckpt.get('args'), argparse.Namespace):
        ckpt = dict(ckpt, script='mae_mff.py', args={**vars(ckpt['args']), 'mff_layers': 'none'})
    recorded = ckpt.get('args')
    if isinstance(recorded, dict) and recorded.get('patch_size') and isinstance(recorded.get('model'), str):
        model = re.sub(r'_patch\d+$', f"_patch{recorded['patch_size']}", recorded['model'])
        ckpt = dict(ckpt, args={k: v for k, v in {**recorded, 'model': model}.items() if k != 'patch_size'})
    state = ckpt.get('model')
    if ckpt.get('script') == 'pilamim.py' and isinstance(state, dict) and 'pos_embed' in state:
        old = {k: v for k, v in state.items() if k.endswith('decoder.decoder_pos_embed')
               and v.shape[1] == state['pos_embed'].shape[1] - 1}        # patches only, no cls row
        if old:
            ckpt = dict(ckpt, model={**state, **{k: torch.cat([v.new_zeros(1, 1, v.shape[-1]), v], 1)
                                                 for k, v in old.items()}})
    return ckpt


def script_module(script, path):
    """The pre-training script a checkpoint records, imported from this folder (the file, not a guess)."""
    file = os.path.join(ROOT, os.path.basename(script))
    if not os.path.isfile(file):
        raise InputError(f'{path} was written by {script}, which is not in {ROOT}: put that script beside analyze.py '
                         '(the model and its loss are rebuilt from it)')
    name = os.path.splitext(os.path.basename(file))[0]
    module = sys.modules.get(name)
    if module is None or os.path.abspath(getattr(module, '__file__', '')) != file:
        spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module                                       # before running it, as `import` does
        spec.loader.exec_module(module)
    return module


def pretraining_model(path):
    """-> (model with its decoders, in eval mode; the args it trained with; the script that wrote it).

    The checkpoint's 'script' names the file whose build_model makes the model; its recorded 'args'
    over that script's argparse defaults are the flags (resolve_recipe fills in what it resolves).
    """
    ckpt, found = read_checkpoint(path)                                 # any format, in our own form
    print(f'{path}: {found}')
    ckpt = current_record(ckpt)
    recorded, script = ckpt.get('args'), ckpt.get('script')
    if not isinstance(recorded, dict) or not isinstance(ckpt.get('model'), dict):
        raise InputError(f'{path} ({found}) records no training args, and the pre-training model and loss are '
                         'rebuilt from them: pass a checkpoint written by mae_mff.py, pixmim_mff.py, pilamim.py or a '
                         'copy of one, or an OpenMMLab MAE / MFF / PixMIM pre-training file')
    if not isinstance(script, str):
        raise InputError(f'{path} records no script, and the pre-training model and loss are rebuilt from it: pass '
                         'a checkpoint written by a pre-training script of this project (they record their name)')
    module = script_module(script, path)
    if not all(hasattr(module, f) for f in ('get_args_parser', 'resolve_recipe', 'build_model')):
        raise InputError(f'{path} was written by {script}, which is no pre-training script (it lacks get_args_parser, '
                         'resolve_recipe or build_model): pass a checkpoint of mae_mff.py, pixmim_mff.py, pilamim.py '
                         'or a copy of one')
    train_args = module.get_args_parser().parse_args([])
    vars(train_args).update(recorded)
    module.resolve_recipe(train_args)
    model = module.build_model(train_args)
    load_matching_state(model, ckpt['model'], path)
    return model.eval(), train_args, script


def data_args(args, input_size):
    return argparse.Namespace(data_path=args.data_path, builtin_size=args.builtin_size, builtin_label='shape',
                              seed=args.seed, input_size=input_size)


def first_images(args, input_size):
    """Loader over the first --num_images of the evaluation split, in order, evaluation transform."""
    dataset = build_dataset(data_args(args, input_size), 'val', eval_transform(input_size))
    if not 1 <= args.num_images <= len(dataset):
        raise InputError(f'--num_images {args.num_images} does not fit the evaluation split of {len(dataset)} '
                         f'images: give 1 to {len(dataset)}')
    return DataLoader(Subset(dataset, range(args.num_images)), batch_size=args.batch_size,
                      num_workers=args.num_workers)


def device_of(args):
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise InputError(f'--device {args.device} but CUDA is not available: use --device cpu')
    return device


def write_json(args, name, results):
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, f'{name}.json')
    with open(path, 'w') as f:
        json.dump(results, f, indent=1)
    print(f'wrote {path}')


def save_figure(args, name, draw, results):
    """Draw the PNG with matplotlib if it is installed (the JSON is written either way)."""
    path = os.path.join(args.output_dir, f'{name}.png')
    try:
        import matplotlib
    except ImportError:
        print(f'matplotlib is not installed, so {path} was not drawn: pip install matplotlib')
        return
    matplotlib.use('Agg')                                                # files only, no display
    import matplotlib.pyplot as plt
    fig = draw(plt, results)
    fig.savefig(path, dpi=90, bbox_inches='tight')
    plt.close(fig)
    print(f'wrote {path}')


# ----------------------------------------------------------------------------------------------
# frequency: relative log amplitude of every layer (Park & Kim; MFF Figs. 2 and 4).

@torch.no_grad()
def frequency(args):
    device, results = device_of(args), {}
    for path, label in labelled(args.checkpoint, args.labels):
        encoder = encoder_of(path, args).to(device)
        total, n = 0., 0
        for imgs, _ in progress(first_images(args, encoder.patch_embed.img_size[0]), 0, desc=label):
            imgs = imgs.to(device, non_blocking=True)
            with autocast(device):
                x = encoder.embed(imgs)                                  # (N, 1 + L, D)
                streams = [x] + encoder.forward_blocks(x, list(range(encoder.depth)))  # raw, before the norm
            # A mean over images, so batches combine by their sizes.
            total = total + len(imgs) * torch.stack([relative_log_amplitude(s[:, 1:]) for s in streams])
            n += len(imgs)
        results[label] = {'checkpoint': path, 'num_images': n,
                          'layers': ['embedding'] + [f'block {i}' for i in range(encoder.depth)],
                          'relative_log_amplitude': (total / n).cpu().tolist()}
    write_json(args, 'frequency', results)
    save_figure(args, 'frequency', draw_frequency, results)


def draw_frequency(plt, results):
    """Fig. 2 per checkpoint (one curve per layer, colour by depth), then Fig. 4 (last layer per band)."""
    fig, axes = plt.subplots(1, len(results) + 1, figsize=(3.6 * (len(results) + 1), 3), squeeze=False,
                             layout='constrained')
    for ax, (label, r) in zip(axes[0], results.items()):
        amps = r['relative_log_amplitude']
        for i, amp in enumerate(amps):
            ax.plot([k / len(amp) for k in range(len(amp))], amp, color=plt.cm.plasma(i / len(amps)))
        ax.set(title=label, xlabel='frequency (x pi)', ylabel='relative log amplitude')
    fig.colorbar(plt.cm.ScalarMappable(cmap='plasma'), ax=list(axes[0, :-1]), label='relative depth (0 = embedding)')
    ax, width = axes[0, -1], 0.8 / len(results)
    for j, (label, r) in enumerate(results.items()):
        last = r['relative_log_amplitude'][-1]
        ax.bar([b + 1 + (j - (len(results) - 1) / 2) * width for b in range(len(last))], last, width, label=label)
    ax.set(title='last block', xlabel='frequency band (1 = lowest)', ylabel='relative log amplitude')
    ax.legend(fontsize=7)
    return fig


# ----------------------------------------------------------------------------------------------
# entropy: how spread out the attention of each block is ("Beyond [cls]", main_attention_stats.py).

@torch.no_grad()
def entropy(args):
    device, results = device_of(args), {}
    for path, label in labelled(args.checkpoint, args.labels):
        encoder = encoder_of(path, args).to(device)
        cls, patch, n = 0., 0., 0
        for imgs, _ in progress(first_images(args, encoder.patch_embed.img_size[0]), 0, desc=label):
            imgs = imgs.to(device, non_blocking=True)
            with autocast(device):                                       # the probabilities are fp32
                c, p = attention_entropy(encoder, imgs)                  # (depth,) each
            cls, patch, n = cls + len(imgs) * c, patch + len(imgs) * p, n + len(imgs)
        results[label] = {'checkpoint': path, 'num_images': n, 'max_entropy': math.log(encoder.num_patches),
                          'cls': (cls / n).cpu().tolist(), 'patch': (patch / n).cpu().tolist()}
    write_json(args, 'attention_entropy', results)
    save_figure(args, 'attention_entropy', draw_entropy, results)


def draw_entropy(plt, results):
    fig, ax = plt.subplots(figsize=(4.5, 3))
    for j, (label, r) in enumerate(results.items()):
        blocks = range(len(r['cls']))
        ax.plot(blocks, r['cls'], '-o', ms=3, color=f'C{j}', label=f'{label} [cls] query')
        ax.plot(blocks, r['patch'], '--s', ms=3, color=f'C{j}', label=f'{label} patch queries')
    ax.axhline(next(iter(results.values()))['max_entropy'], color='gray', lw=1, label='ln L (uniform)')
    ax.set(xlabel='block', ylabel='attention entropy (nats)')
    ax.legend(fontsize=6)
    return fig


# ----------------------------------------------------------------------------------------------
# hessian: top Hessian eigenvalues of the pre-training loss per augmented batch (MFF Fig. 5).

def hessian(args):
    device, results = device_of(args), {}
    for path, label in labelled(args.checkpoint, args.labels):
        model, train_args, script = pretraining_model(path)
        model.to(device)                                                 # eval mode: no drop-path
        dataset = build_dataset(data_args(args, train_args.input_size), 'train',
                                train_transform(train_args.input_size, train_args.crop))
        if args.batches * args.batch_size > len(dataset):
            raise InputError(f'--batches {args.batches} x --batch_size {args.batch_size} is more than the '
                             f'{len(dataset)} training images: lower either')
        # Batches, crops and masks drawn up front from the seed: the same for every checkpoint.
        torch.manual_seed(args.seed)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)
        batches = [(imgs, torch.rand(len(imgs), model.num_patches))    # one fixed mask per batch
                   for imgs, _ in itertools.islice(loader, args.batches)]
        spectra = []
        for imgs, noise in progress(batches, 0, desc=label):
            imgs, noise = imgs.to(device), noise.to(device)
            spectra.append(hessian_top_eigenvalues(                     # fp32: no autocast here
                lambda: model(imgs, train_args.mask_ratio, noise=noise)[0], model.parameters(),  # its own loss
                k=args.top_k, max_iter=args.max_iter, tol=args.tol))
        results[label] = {'checkpoint': path, 'script': script, 'batch_size': args.batch_size,
                          'eigenvalues': spectra}
    write_json(args, 'hessian', results)
    save_figure(args, 'hessian', draw_hessian, results)


def draw_hessian(plt, results):
    """The pooled top-k eigenvalues of every batch, as a density per checkpoint (Park & Kim, MFF Fig. 5)."""
    fig, ax = plt.subplots(figsize=(4.5, 3))
    values = {label: [v for batch in r['eigenvalues'] for v in batch] for label, r in results.items()}
    everything = [v for vs in values.values() for v in vs]
    bins = torch.linspace(min(everything), max(everything) + 1e-6, 30).tolist()
    for label, vs in values.items():
        ax.hist(vs, bins=bins, alpha=0.5, density=True, label=label)
    ax.set(xlabel='Hessian eigenvalue (top-k of each batch)', ylabel='density')
    ax.legend(fontsize=7)
    return fig


# ----------------------------------------------------------------------------------------------
# fusion: the softmaxed fusion weights against training progress (MFF Figs. 1, 6, 8).

def read_jsonl(path):
    if not os.path.isfile(path):
        raise InputError(f'log {path} does not exist: pass <output_dir>/log.jsonl of a pre-training run')
    records = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise InputError(f'{path} line {i} is not JSON: the log is damaged; delete that line') from None
    if not records:
        raise InputError(f'log {path} is empty: the run has not finished a logging interval yet')
    return records


def fusion_curve(path):
    """-> (file read, records with fusion weights, by step).

    The pre-training scripts write the weights every --print_freq steps to fusion_weights.jsonl
    beside log.jsonl; runs from before that have only the per-epoch weights in log.jsonl. A line
    written after a restart replaces the earlier lines of the steps it repeats (resume, fresh run).
    """
    fine = os.path.join(os.path.dirname(path), 'fusion_weights.jsonl')
    source = fine if os.path.isfile(path) and os.path.isfile(fine) else path
    kept = []
    for r in read_jsonl(source):
        if isinstance(r, dict) and r.get('fusion_weights'):
            kept = [k for k in kept if k['step'] < r['step']] + [r]
    if not kept:
        raise InputError(f'{source} holds no fusion weights: the run had MFF off (--mff_layers none) or attention '
                         'fusion (--mff_fusion attn), which have no weights to draw')
    return source, kept


def fusion(args):
    """Weights against training progress from pre-training logs, or the learned weights of checkpoints
    (released OpenMMLab MFF files too: paper Fig. 6)."""
    results = {}
    for path, label in labelled(args.log or args.checkpoint, args.labels):
        if args.checkpoint:
            model = pretraining_model(path)[0]
            if model.fusion_weights() is None:
                raise InputError(f'{path} has no weighted fusion (MFF off, or attention fusion): it has no weights '
                                 'to show; pass an MFF checkpoint')
            results[label] = {'checkpoint': path, 'levels': model.mff_layers, 'fusion_weights': model.fusion_weights()}
            print(f'{label}: fusion weights {model.fusion_weights()} on blocks {model.mff_layers}')
            continue
        source, records = fusion_curve(path)
        levels = records[-1].get('levels') or list(range(len(records[-1]['fusion_weights'])))
        results[label] = {'log': source, 'levels': levels, 'epoch': [r['epoch'] for r in records],
                          'step': [r['step'] for r in records],
                          'fusion_weights': [r['fusion_weights'] for r in records]}
        print(f'{label}: {len(records)} points from {source}, last weights {records[-1]["fusion_weights"]}')
    write_json(args, 'fusion', results)
    save_figure(args, 'fusion', draw_fusion, results)


def draw_fusion(plt, results):
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3), squeeze=False)
    for ax, (label, r) in zip(axes[0], results.items()):
        if 'checkpoint' in r:                                            # one checkpoint: a bar per level
            ax.bar([f'block {level}' for level in r['levels']], r['fusion_weights'])
            ax.set(title=label, ylabel='fusion weight (softmax)')
            ax.tick_params(axis='x', labelsize=6)
            continue
        weights = list(zip(*r['fusion_weights']))                        # per level
        for i, (level, w) in enumerate(zip(r['levels'], weights)):
            ax.plot(r['epoch'], w, color=plt.cm.viridis(i / max(len(weights) - 1, 1)), label=f'block {level}')
        ax.set(title=label, xlabel='epoch', ylabel='fusion weight (softmax)')
        ax.legend(fontsize=6)
    return fig


# ----------------------------------------------------------------------------------------------
# reconstruct: original / masked / reconstruction with the visible patches pasted back / target.

def to_pixels(x):
    """Normalised (N, 3, H, W) -> [0, 1] RGB."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() * std + mean).clamp(0, 1)


@torch.no_grad()
def reconstruct(args):
    device, results = device_of(args), {}
    for path, label in labelled(args.checkpoint, args.labels):
        model, train_args, script = pretraining_model(path)
        model.to(device)
        p = model.patch_size
        imgs = torch.cat([x for x, _ in first_images(args, train_args.input_size)]).to(device)
        torch.manual_seed(args.seed)
        noise = torch.rand(len(imgs), model.num_patches, device=device)
        with autocast(device):
            loss, pred, mask = model(imgs, train_args.mask_ratio, noise=noise)[:3]   # the contract of common.py
        pred, target = pred.float(), model.reconstruction_target(imgs)   # (N, L, p*p*3); mask 1 = removed
        if model.norm_pix_loss:                                          # back to pixels: each patch's own stats
            t = patchify(target, p)
            pred = pred * (t.var(dim=-1, keepdim=True) + 1.e-6) ** .5 + t.mean(dim=-1, keepdim=True)
        mask = unpatchify(mask[..., None].expand(-1, -1, p * p * 3), p)  # (N, 3, H, W)
        columns = {'original': imgs, 'masked': imgs * (1 - mask),        # removed patches: the mean colour
                   'reconstruction + visible': imgs * (1 - mask) + unpatchify(pred, p) * mask}
        if not torch.equal(target, imgs):                                # e.g. PixMIM's low-pass image
            columns['target'] = target
        grid = torch.stack([to_pixels(c) for c in columns.values()], dim=1).flatten(0, 1)  # row per image
        scale = max(1, 96 // train_args.input_size)                     # small images: nearest upscaling
        grid = torch.nn.functional.interpolate(grid, scale_factor=scale, mode='nearest')
        os.makedirs(args.output_dir, exist_ok=True)
        png = os.path.join(args.output_dir, f'reconstruct_{len(results)}.png')
        save_image(make_grid(grid, nrow=len(columns), padding=2, pad_value=1.), png)
        print(f'wrote {png} ({label}; columns: {", ".join(columns)})')
        results[label] = {'checkpoint': path, 'script': script, 'png': png, 'columns': list(columns),
                          'mask_ratio': train_args.mask_ratio, 'loss': float(loss)}
    write_json(args, 'reconstruct', results)


# ----------------------------------------------------------------------------------------------
# Command line.

def main(args):
    {'frequency': frequency, 'entropy': entropy, 'hessian': hessian, 'fusion': fusion,
     'reconstruct': reconstruct}[args.command](args)


def get_args_parser():
    shared = argparse.ArgumentParser(add_help=False)
    a = shared.add_argument
    a('--output_dir', default='./output/analysis', help='<command>.json and the figures go here')
    a('--labels', nargs='+', help='names in the JSON and the legends, one per input (default <run folder>/<file>)')
    images = argparse.ArgumentParser(add_help=False)
    a = images.add_argument
    a('--checkpoint', nargs='+', required=True, help='checkpoints to compare on the same images')
    a('--data_path', default='', help='ImageNet-style root with val/ and train/; empty = built-in shapes')
    a('--builtin_size', type=int, default=4096, help='built-in training images (the evaluation split has a quarter)')
    a('--seed', type=int, default=0, help='built-in data seed (as in training), and of masks and batches')
    a('--batch_size', type=int, default=64)
    a('--num_workers', type=int, default=2)
    a('--device', default='cuda' if torch.cuda.is_available() else 'cpu')

    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = p.add_subparsers(dest='command', required=True)
    for name, help_, num_images in (('frequency', 'relative log amplitude per layer (MFF Figs. 2, 4)', 256),
                                    ('entropy', 'attention entropy per block ("Beyond [cls]")', 256),
                                    ('reconstruct', 'PNG grid: original / masked / reconstruction / target', 8)):
        s = sub.add_parser(name, parents=[shared, images], help=help_)
        s.add_argument('--num_images', type=int, default=num_images,
                       help='the first this many images of the evaluation split, in order')
        if name != 'reconstruct':
            s.add_argument('--num_heads', type=int, default=None,
                           help='only for encoders of a non-standard width (heads have no shape in the weights)')
    s = sub.add_parser('hessian', parents=[shared, images], help='top Hessian eigenvalues per batch (MFF Fig. 5)')
    s.add_argument('--batches', type=int, default=8, help='augmented training batches, each with its own mask')
    s.add_argument('--top_k', type=int, default=5, help='eigenvalues per batch (Park & Kim pool the top 5)')
    s.add_argument('--max_iter', type=int, default=100, help="power-iteration steps per eigenvalue (PyHessian's)")
    s.add_argument('--tol', type=float, default=1e-3, help="relative change that ends the iteration (PyHessian's)")
    s.set_defaults(batch_size=32)
    s = sub.add_parser('fusion', parents=[shared], help='fusion weights against training progress (MFF Figs. 1, 6, 8)')
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument('--log', nargs='+', help='<output_dir>/log.jsonl of MFF pre-training runs')
    source.add_argument('--checkpoint', nargs='+', help='MFF pre-training checkpoints (ours or OpenMMLab): their '
                        'learned weights')
    return p


if __name__ == '__main__':
    run(main, get_args_parser())
