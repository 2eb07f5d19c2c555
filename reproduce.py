"""The papers' claims tested at laptop scale, with error bars, in one command.

    python reproduce.py                          # 4 methods x 3 seeds, probes and analyses: under 2 h on 2 CPU cores
    python reproduce.py --all                    # + PixMIM, MFF-PixMIM, k-NN, fine-tuning, low-shot: about 3 h 20 min
    python reproduce.py --quick                  # 1 seed, fewer epochs: about 15 min
    python reproduce.py --only pretrain,probe,mae,mff_mae      # some parts and/or some methods
    python reproduce.py --skip hessian           # the default study but one part
    python reproduce.py --dry_run                # print the command lines only
    python reproduce.py --scale gpu --data_path /imagenet100   # the next rung: ViT-S at 64 px
    python reproduce.py --data_path DIR          # any ImageNet-style folder: batches fitted to its size

Every step is one command line of the project's scripts, printed as it starts (so this file also
documents how to run them), with its own folder under --output_dir/<setting>. A step whose result
file exists is skipped: a killed study picks up where it stopped, and pre-training and
fine-tuning resume inside a run (--resume auto). At the end: results.json (every number of every
seed), results.md (mean +- std over seeds, and the claims table: each published claim, the
measured difference +- its standard error, the smallest difference it could detect (2 SE) and a
verdict; and where the spread over seeds comes from) and figures/ (analyze.py's PNGs).

Sections: settings -> the study as steps -> running -> reading results -> claims -> reports -> CLI.
"""
import argparse
import glob
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import namedtuple

from torchvision.datasets.folder import IMG_EXTENSIONS

from common import InputError, run, vit_arch
from mae_mff import paper_mff_layers

ROOT = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------
# Settings. One shared setting per scale: every method gets the same encoder, image size, images,
# epochs, batch, lr rule (lr = blr x batch / 256) and per-iteration warm-up + cosine; what remains
# different is each method's own recipe (target, crop, weight-decay rule: the scripts' defaults),
# which is what the papers compare. The `mae_control` run gives MAE MFF's crop and weight-decay
# rule, so that MFF-MAE - mae_control is the fusion alone (and PixMIM - mae_control the target alone).
#
# Every evaluation reads the same images (--builtin_seed 0; a folder's own split), so differences
# between checkpoints are paired. The [cls] and mean probes of the claims are a multinomial logistic
# regression solved by L-BFGS on cached features (probe.py --solver lbfgs): deterministic given the
# features, so their spread over seeds is pre-training plus evaluation, nothing else; they are
# scored on 4096 evaluation images (binomial SE about 0.8 points at 50%). The SGD probe (LARS, the
# MAE / Beyond [cls] recipe) keeps the default 512: Selective Aggregation vs [cls], raw vs raw.
#
# What runs by default (`methods`, `parts`) fits 2 h on 2 idle CPU cores: the comparisons whose 2 SE
# here is under 3x the published gap (measured). PixMIM (+1.6) and MFF-PixMIM (+1.0), full and
# low-shot fine-tuning (+0.5 to +2.3; fine-tuning spreads by 6 points over seeds here) and k-NN (no
# claim) run with --all or when --only names them. Budget and the 20 epochs: docs/reproduce.md.

# method -> (script, flags). PiLaMIM's default is no MFF, as in its paper; it gets the per-iteration
# schedule of the other methods (its public code's per-epoch steps would skip a 1-2 epoch warm-up).
METHODS = {'mae': ('mae_mff.py', ['--mff_layers', 'none']),
           'mae_control': ('mae_mff.py', ['--mff_layers', 'none', '--crop', 'simple', '--wd_rule', 'mmpretrain']),
           'mff_mae': ('mae_mff.py', ['--mff_layers', 'paper']),
           'pixmim': ('pixmim_mff.py', ['--mff_layers', 'none']),
           'mff_pixmim': ('pixmim_mff.py', ['--mff_layers', 'paper']),
           'pilamim': ('pilamim.py', ['--lr_schedule', 'iter'])}
NAMES = {'mae': 'MAE', 'mae_control': "MAE, MFF's recipe", 'mff_mae': 'MFF-MAE', 'pixmim': 'PixMIM',
         'mff_pixmim': 'MFF-PixMIM', 'pilamim': 'PiLaMIM', 'pilot': 'MFF pilot (all levels)'}
ALL_METHODS = (*METHODS, 'pilot')
NOISE_METHODS = ('mae', 'mff_mae')               # the probe-seed measurement: their seed-0 checkpoints
ANALYSES = ('entropy', 'frequency', 'hessian', 'fusion', 'reconstruct')
PARTS = ('pretrain', 'probe', 'knn', 'noise', 'finetune', 'lowshot') + ANALYSES
RESULT_FILE = {'entropy': 'attention_entropy.json', 'frequency': 'frequency.json', 'hessian': 'hessian.json',
               'fusion': 'fusion.json', 'reconstruct': 'reconstruct.json'}
# Recipes of the evaluations (passed explicitly, on the built-in data and on a folder alike): the
# probe's LARS recipe and the fine-tuning recipe of probe.py's / finetune.py's laptop presets.
EVAL_RECIPE = dict(probe_warmup=3, probe_blr=30., ft_warmup=1, ft_blr=1e-2, ft_layer_decay=0.9, ft_crop_min=0.35)
SCALES = {
    'laptop': dict(methods=('mae', 'mae_control', 'mff_mae', 'pilamim', 'pilot'),
                   parts=('pretrain', 'probe', 'noise', *ANALYSES),
                   model='mae_vit_tiny_patch4', depth=6, input_size=32, decoder=(128, 2, 4),
                   batch_size=128, blr=1.5e-3, epochs=20, warmup_epochs=2, pretrain_images=2048, seeds=3,
                   tasks=('shape', 'count'), probe_images=2048, lbfgs_val_images=4096, probe_batch=256,
                   probe_epochs=30, probe_seeds=3, ft_epochs=5, ft_batch=64, lowshot_epochs=(15, 30),
                   lowshot_batch=16, num_images=256, hessian=(2, 3, 32), workers=0,
                   finetune_methods=('mae', 'mae_control', 'mff_mae'),
                   hessian_methods=('mae', 'mae_control', 'mff_mae'),
                   quick=dict(seeds=1, epochs=5, warmup_epochs=1, probe_images=1024, lbfgs_val_images=1024,
                              probe_seeds=1, ft_epochs=2, lowshot_epochs=(8, 15), hessian=(2, 2, 32))),
    # The GPU rung: ViT-S at 64 px (16 x 16 patches of 4 px), more images and epochs.
    'gpu': dict(methods=ALL_METHODS, parts=PARTS,
                model='mae_vit_small_patch4', depth=None, input_size=64, decoder=(256, 4, 8),
                batch_size=256, blr=1e-3, epochs=100, warmup_epochs=10, pretrain_images=50000, seeds=3,
                tasks=('shape', 'count'), probe_images=10000, lbfgs_val_images=10000, probe_batch=512,
                probe_epochs=50, probe_seeds=3, ft_epochs=20, ft_batch=128, lowshot_epochs=(50, 100),
                lowshot_batch=32, num_images=1024, hessian=(8, 5, 64), workers=8,
                finetune_methods=('mae', 'mae_control', 'mff_mae', 'pixmim', 'mff_pixmim', 'pilamim'),
                hessian_methods=('mae', 'mae_control', 'mff_mae', 'pixmim', 'mff_pixmim'),
                quick=dict(seeds=1, epochs=20, warmup_epochs=2, probe_seeds=1)),
    # The test suite's miniature (test_smoke.py): seconds per step, numbers meaningless.
    'test': dict(methods=ALL_METHODS, parts=PARTS,
                 model='mae_vit_tiny_patch4', depth=2, input_size=16, decoder=(32, 1, 2),
                 batch_size=16, blr=1e-3, epochs=1, warmup_epochs=1, pretrain_images=64, seeds=1,
                 tasks=('shape',), probe_images=64, lbfgs_val_images=128, probe_batch=32, probe_epochs=2,
                 probe_seeds=2, ft_epochs=1, ft_batch=16, lowshot_epochs=(1, 1), lowshot_batch=4, num_images=16,
                 hessian=(1, 1, 8), workers=0, finetune_methods=('mae', 'mff_mae'),
                 hessian_methods=('mae', 'mff_mae'), quick=dict()),
}

SCRIPT_OF = {'probe': 'probe.py', 'knn': 'probe.py', 'noise': 'probe.py', 'finetune': 'finetune.py',
             'lowshot': 'finetune.py', **{a: 'analyze.py' for a in ANALYSES}}
# Seconds per image on 2 idle cores at ViT-tiny depth 12, 64 tokens (README figures); only the
# ratios matter: they weight the steps for the time-left estimate, which calibrates itself.
SECONDS_PER_IMAGE = {'mae_mff.py': 1 / 140, 'pixmim_mff.py': 1 / 135, 'pilamim.py': 1 / 68, 'forward': 1 / 114}
START_UP = 4.                                                            # seconds to import torch and timm
EVAL_SEED = 0                                   # --builtin_seed of every evaluation: the same images for all

# runs: the (method, seed) a step measures; key: ((result file, metric), ...) of an evaluation, the --labels of
# an analysis.
Step = namedtuple('Step', 'part name cmd out done needs cost runs key')


def setting(args):
    """The scale's table, with --quick / --seeds / --epochs and a folder's size applied; -> (cfg, folder name)."""
    cfg = {**EVAL_RECIPE, **SCALES[args.scale]}
    if args.quick:
        cfg.update(cfg['quick'])
    for k in ('seeds', 'epochs'):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    arch = vit_arch(cfg['model'], cfg['depth'])                          # the --model name states the patch
    cfg['depth'], cfg['patch_size'] = arch['depth'], arch['patch_size']
    cfg['tasks'] = ('data',) if args.data_path else cfg['tasks']        # a folder has one label kind
    grid = cfg['input_size'] // cfg['patch_size']
    cfg['tokens'] = grid * grid
    if args.data_path:                                                   # the folder's size sets the batches
        cfg['train_counts'], n_val = image_counts(args.data_path, 'train'), sum(image_counts(args.data_path, 'val').values())
        n = sum(cfg['train_counts'].values())
        cfg.update(pretrain_images=n, probe_images=n, val_images=n_val, lbfgs_val_images=n_val,
                   num_images=min(cfg['num_images'], n_val))
    else:
        cfg['train_counts'], cfg['val_images'] = None, max(cfg['probe_images'] // 4, 256)  # common.build_dataset
    name = args.scale + ('_quick' if args.quick else '') + (f'_e{args.epochs}' if args.epochs else '') \
        + (f'_{os.path.basename(os.path.normpath(args.data_path))}' if args.data_path else '')
    return cfg, name


def image_counts(root, split):
    """{class: number of image files} of an ImageNet-style <root>/<split>/<class>/ (what ImageFolder reads)."""
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise InputError(f'no {split}/ folder in --data_path {root}: expected {folder}/<class>/<image> '
                         '(ImageNet layout), or omit --data_path for the built-in data')
    counts = {c.name: sum(1 for f in os.scandir(c.path) if f.name.lower().endswith(IMG_EXTENSIONS))
              for c in os.scandir(folder) if c.is_dir()}
    if not sum(counts.values()):
        raise InputError(f'{folder} holds no images: put images in {folder}/<class>/')
    return counts


def lowshot_fractions(cfg, args):
    """{'10%': 0.1, '1%': f}: on a folder the real 1%; on the built-in data (4 classes) 13 images per
    class, as ImageNet's 1% subset has, since 1% of a few thousand images is too few to train on."""
    return {'10%': 0.1, '1%': 0.01 if args.data_path else 13 * 4 / cfg['probe_images']}


def subset_size(cfg, fraction):
    """Images finetune.py's --train_fraction keeps: round(fraction x n) per class, at least one."""
    counts = cfg['train_counts'] or {c: cfg['probe_images'] / 4 for c in range(4)}
    return sum(max(1, round(fraction * n)) for n in counts.values())


# ----------------------------------------------------------------------------------------------
# The study as a list of steps: one command line each, in the order they must run.

def data_flags(args, images, task=None, evaluation=False, val_images=None):
    """A folder as it is; the built-in data: `images` training images of the label kind. An evaluation
    draws them with EVAL_SEED, so that every checkpoint is measured on the same images, and may ask
    for more validation images than the default quarter of `images`."""
    if args.data_path:
        return ['--data_path', args.data_path]
    return ['--builtin_size', images] + (['--builtin_label', task] if task else []) \
        + (['--builtin_seed', EVAL_SEED] if evaluation else []) + (['--builtin_val_size', val_images] if val_images else [])


def probe_recipe(cfg, seed):
    """probe.py's laptop recipe, explicit: LARS on cached features, the batch capped by the training set."""
    return ['--no_aug', '--batch_size', min(cfg['probe_batch'], cfg['probe_images']), '--accum_iter', 1,
            '--epochs', cfg['probe_epochs'], '--warmup_epochs', cfg['probe_warmup'], '--blr', cfg['probe_blr'],
            '--num_workers', cfg['workers'], '--seed', seed]


def finetune_recipe(cfg, epochs, batch, images, seed):
    """finetune.py's laptop recipe, explicit: no RandAugment / erasing / Mixup / CutMix, crops of >= 35%."""
    return ['--epochs', epochs, '--batch_size', max(1, min(batch, images)), '--accum_iter', 1,
            '--warmup_epochs', cfg['ft_warmup'], '--blr', cfg['ft_blr'], '--layer_decay', cfg['ft_layer_decay'],
            '--crop_min', cfg['ft_crop_min'], '--aa', '', '--reprob', 0, '--mixup', 0, '--cutmix', 0,
            '--num_workers', cfg['workers'], '--seed', seed]


def plan(args, cfg, root, selected=True):
    """The steps of the study: the scale's default parts and methods (all with --all), or those --only names,
    less --skip; every step of every part and method with selected=False (what the report reads)."""
    every = not selected or args.all
    only, skip = (args.only, args.skip) if selected else (set(), set())
    parts, names = (set(PARTS), set(NAMES)) if every else (set(cfg['parts']), set(cfg['methods']))
    want_part = lambda p: (p in only if only & set(PARTS) else p in parts) and p not in skip  # noqa: E731
    want = lambda m: (m in only if only & set(NAMES) else m in names) and m not in skip     # noqa: E731
    d, E, f = cfg['depth'], cfg['epochs'], cfg['depth'] * cfg['tokens'] / (12 * 64)  # f: cost vs the laptop preset
    seeds = range(cfg['seeds'])
    pilot_layers = list(range(d))
    methods = [m for m in METHODS if want(m)]
    pretrained = [(m, s) for s in seeds for m in methods]
    if paper_mff_layers(d) != pilot_layers and want('pilot'):           # else MFF-MAE is the pilot
        pretrained.append(('pilot', 0))
    folder = lambda part, *tags: os.path.join(root, part, '_'.join(map(str, tags)))  # noqa: E731
    ckpt = lambda m, s: os.path.join(folder('pretrain', m, f's{s}'), f'checkpoint-{E}.pth')  # noqa: E731
    forward = lambda images: SECONDS_PER_IMAGE['forward'] * f * images  # noqa: E731
    steps = []

    def add(part, name, cmd, out, done, needs, cost, runs, key=None):
        if want_part(part):
            steps.append(Step(part, name, cmd, out, os.path.join(out, done), needs, cost + START_UP, runs, key))

    dim, ddepth, heads = cfg['decoder']
    for m, s in pretrained:
        script, flags = METHODS['mff_mae'][0], ['--mff_layers', ','.join(map(str, pilot_layers))]
        if m != 'pilot':
            script, flags = METHODS[m]
        out = folder('pretrain', m, f's{s}')
        cmd = [script, '--model', cfg['model'], '--depth', d, '--input_size', cfg['input_size'],
               '--decoder_embed_dim', dim, '--decoder_depth', ddepth,
               '--decoder_num_heads', heads, '--batch_size', min(cfg['batch_size'], cfg['pretrain_images']),
               '--accum_iter', 1, '--blr', cfg['blr'], '--epochs', E, '--warmup_epochs', cfg['warmup_epochs'],
               '--save_freq', E, '--print_freq', 4,                      # fusion weights every 4 steps: a curve
               '--num_workers', cfg['workers'], '--seed', s, '--output_dir', out, '--resume', 'auto',
               *flags, *data_flags(args, cfg['pretrain_images'])]
        add('pretrain', f'pretrain {m} seed {s}', cmd, out, f'checkpoint-{E}.pth', [],
            SECONDS_PER_IMAGE[script] * f * E * cfg['pretrain_images'], [(m, s)])

    # Evaluations of every checkpoint; key: ((result file, metric), ...) of the step.
    n_probe = cfg['probe_images'] + cfg['val_images']
    probed = [(m, s) for m, s in pretrained if m != 'pilot']
    semantic = cfg['tasks'][0]                                           # fine-tune and SGD probes: semantic task
    last = f'block{d - 1}.json'
    for m, s in probed:
        for task in cfg['tasks']:
            data = lambda val=None: data_flags(args, cfg['probe_images'], task, True, val)  # noqa: E731
            base = ['probe.py', '--checkpoint', ckpt(m, s), *probe_recipe(cfg, s)]
            # The claims' [cls] and mean probes: logistic regression (L-BFGS) on MAE's post-norm features.
            out = folder('probe', m, f's{s}', 'lbfgs', task)
            add('probe', f'probe cls,mean (L-BFGS) {task} {m} seed {s}',
                [*base, '--pool', 'cls,mean', '--solver', 'lbfgs', '--output_dir', out,
                 *data(cfg['lbfgs_val_images'])], out, f'probe_mean_{last}', [ckpt(m, s)],
                forward(cfg['probe_images'] + cfg['lbfgs_val_images']), [(m, s)],
                ((f'probe_cls_{last}', f'cls_{task}'), (f'probe_mean_{last}', f'mean_{task}')))
            if task != semantic:
                continue
            # Selective Aggregation vs [cls], raw vs raw as Beyond [cls] (LARS).
            out = folder('probe', m, f's{s}', 'raw', task)
            add('probe', f'probe cls,abmilp (raw) {task} {m} seed {s}',
                [*base, '--pool', 'cls,abmilp', '--feature_norm', 'off', '--output_dir', out, *data()], out,
                f'probe_abmilp_{last}', [ckpt(m, s)], forward(n_probe) + 5, [(m, s)],
                ((f'probe_cls_{last}', f'clsraw_{task}'), (f'probe_abmilp_{last}', f'abmilp_{task}')))
            out = folder('knn', m, f's{s}', task)
            add('knn', f'k-NN {task} {m} seed {s}',
                ['probe.py', '--checkpoint', ckpt(m, s), '--knn', '--num_workers', cfg['workers'], '--seed', s,
                 '--output_dir', out, *data()],
                out, f'knn_cls_{last}', [ckpt(m, s)], forward(n_probe), [(m, s)], ((f'knn_cls_{last}', f'knn_{task}'),))

    # Probe noise: the same checkpoint, SGD probes with other seeds (the L-BFGS probe has none).
    for m in [m for m in NOISE_METHODS if (m, 0) in probed]:
        for p in range(1, cfg['probe_seeds']):
            out = folder('noise', m, 's0', f'probe_seed{p}', 'raw')
            add('noise', f'probe seed {p} cls,abmilp (raw) {semantic} {m} seed 0',
                ['probe.py', '--checkpoint', ckpt(m, 0), *probe_recipe(cfg, p), '--pool', 'cls,abmilp',
                 '--feature_norm', 'off', '--output_dir', out, *data_flags(args, cfg['probe_images'], semantic, True)],
                out, f'probe_abmilp_{last}', [ckpt(m, 0)], forward(n_probe), [(m, p)],
                tuple((f'probe_{pool}_{last}', f'probe_seed:{pool.replace("cls", "clsraw")}_{semantic}')
                      for pool in ('cls', 'abmilp')))

    for m, s in [(m, s) for m, s in probed if m in cfg['finetune_methods']]:
        runs = [('finetune', 'full', None, cfg['ft_epochs'], cfg['ft_batch'])] + [
            ('lowshot', label, frac, ep, cfg['lowshot_batch'])
            for (label, frac), ep in zip(lowshot_fractions(cfg, args).items(), cfg['lowshot_epochs'])]
        for part, label, frac, ep, batch in runs:
            images = subset_size(cfg, frac) if frac else cfg['probe_images']
            out = folder(part, m, f's{s}', label.rstrip('%'))
            cmd = ['finetune.py', '--checkpoint', ckpt(m, s), *finetune_recipe(cfg, ep, batch, images, s),
                   '--eval_freq', ep, '--output_dir', out, '--resume', 'auto',     # top-1 of the last epoch only
                   *(['--train_fraction', round(frac, 4)] if frac else []),
                   *data_flags(args, cfg['probe_images'], semantic if semantic != 'data' else None, True)]
            add(part, f'{part} {label} {m} seed {s}', cmd, out, 'finetune.json', [ckpt(m, s)],
                forward(3 * ep * images + cfg['val_images']), [(m, s)],
                (('finetune.json', 'finetune' if part == 'finetune' else f'lowshot_{label}'),))

    batches, top_k, hbatch = cfg['hessian']
    for s in seeds:                                                      # one call per seed: methods side by side
        for kind in ('entropy', 'frequency', 'hessian') + (('reconstruct',) if s == 0 else ()):
            ms = [m for m in methods if kind != 'hessian' or m in cfg['hessian_methods']]
            if not ms:
                continue
            out = folder('analysis', kind, f's{s}')
            extra = ['--batches', batches, '--top_k', top_k, '--batch_size', min(hbatch, cfg['pretrain_images'])] \
                if kind == 'hessian' else ['--num_images', min(cfg['num_images'], 8) if kind == 'reconstruct'
                                           else cfg['num_images']]
            cmd = ['analyze.py', kind, '--checkpoint', *[ckpt(m, s) for m in ms], '--labels', *ms, '--seed', s,
                   '--num_workers', cfg['workers'], '--output_dir', out, *extra,
                   *data_flags(args, cfg['probe_images'])]
            per_ckpt = batches * top_k * 20 * 6 * hbatch if kind == 'hessian' else cfg['num_images']  # ~20 HVPs each
            add(kind, f'{kind} seed {s}', cmd, out, RESULT_FILE[kind], [ckpt(m, s) for m in ms],
                forward(per_ckpt * len(ms)), [(m, s) for m in ms], tuple(ms))
    logs = [(m, s) for m, s in pretrained if m in ('mff_mae', 'mff_pixmim', 'pilot')]
    if logs:
        out = folder('analysis', 'fusion')
        paths = [os.path.join(os.path.dirname(ckpt(m, s)), 'log.jsonl') for m, s in logs]
        cmd = ['analyze.py', 'fusion', '--log', *paths, '--labels', *[f'{m}_s{s}' for m, s in logs],
               '--output_dir', out]
        add('fusion', 'fusion weights', cmd, out, RESULT_FILE['fusion'], [ckpt(m, s) for m, s in logs], 0., logs,
            tuple(f'{m}_s{s}' for m, s in logs))
    return steps


# ----------------------------------------------------------------------------------------------
# Running: skip what is done, run the rest one after the other, say how long is left.

def minutes(seconds):
    return f'{seconds / 60:.0f} min' if seconds >= 90 else f'{seconds:.0f} s'


def shown(cmd):
    return 'python ' + shlex.join(map(str, cmd))                         # quoted: copy-paste runs it


def finished(step):
    """Its result file exists; an analysis' (key: its --labels) holds every run it compares, so that adding
    methods to a finished study reruns the analyses that set them side by side."""
    if not os.path.exists(step.done):
        return False
    return step.part not in ANALYSES or set(step.key) <= set(read_json(step.done))


def execute(steps, dry_run):
    todo = [s for s in steps if not finished(s)]
    print(f'{len(steps)} steps: {len(steps) - len(todo)} done already (skipped), {len(todo)} to run; '
          f'OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS", "unset")}', flush=True)
    missing = sorted({SCRIPT_OF.get(s.part, s.cmd[0]) for s in todo} - set(os.listdir(ROOT)))
    if missing and not dry_run:
        parts = sorted({s.part for s in todo if SCRIPT_OF.get(s.part, s.cmd[0]) in missing})
        raise InputError(f'{", ".join(missing)} not found in {ROOT}: add it, or leave its parts out with '
                         f'--skip {",".join(parts)}')
    start, spent, cost_done, cost_left = time.time(), 0., 0., sum(s.cost for s in todo)
    for i, step in enumerate(todo, 1):
        print(f'[{i}/{len(todo)}] {step.name}: {shown(step.cmd)}', flush=True)
        cost_left -= step.cost
        if dry_run:
            continue
        absent = [p for p in step.needs if not os.path.exists(p)]
        if absent:
            print(f'    skipped: {absent[0]} does not exist (run its pre-training: --only pretrain)', flush=True)
            continue
        os.makedirs(step.out, exist_ok=True)
        t0, log_path = time.time(), os.path.join(step.out, 'run.log')
        with open(log_path, 'a') as log:                                 # the script's own output
            rc = subprocess.call([sys.executable, os.path.join(ROOT, step.cmd[0]), *map(str, step.cmd[1:])],
                                 stdout=log, stderr=subprocess.STDOUT)   # env (OMP_NUM_THREADS) passed through
        if rc or not finished(step):
            with open(log_path) as log:
                last = (log.read().strip().splitlines() or ['(no output)'])[-1]
            raise InputError(f'{step.name} failed (exit {rc}): {last} -- full output in {log_path}; fix it and '
                             'rerun the same command (finished steps are kept)')
        if step.part == 'pretrain':                                      # same weights as checkpoint-<epochs>.pth
            last_ckpt = os.path.join(step.out, 'checkpoint-last.pth')
            if os.path.exists(last_ckpt):
                os.remove(last_ckpt)                                     # halves the study's disk use
        spent, cost_done = spent + time.time() - t0, cost_done + step.cost
        print(f'    done in {minutes(time.time() - t0)}; elapsed {minutes(time.time() - start)}, '
              f'about {minutes(max(spent / cost_done * cost_left, 0.))} left', flush=True)


# ----------------------------------------------------------------------------------------------
# Reading the result files: (method, seed, metric, value) rows. These parsers are the only code
# that knows the other scripts' output formats.

def read_json(path):
    with open(path) as f:
        return json.load(f)


def by_label(step):
    """analyze.py's JSON is keyed by --labels (our method names): one entry per (method, seed) run."""
    data = read_json(step.done)
    return [((m, s), data[m]) for m, s in step.runs if m in data]


def parse(step, cfg):
    if step.part == 'pretrain':
        with open(os.path.join(step.out, 'log.jsonl')) as f:
            last = json.loads(f.read().strip().splitlines()[-1])
        (m, s), = step.runs
        yield m, s, 'pretrain_loss', last['loss']
        w = last.get('fusion_weights')
        if w:                                                            # the shallowest level's gain over 1/levels
            yield m, s, 'fusion_w0_gain', w[0] - 1 / len(w)
    elif step.part in ('probe', 'knn', 'noise', 'finetune', 'lowshot'):
        (m, s), = step.runs
        for name, metric in step.key:
            result = read_json(os.path.join(step.out, name))
            yield m, s, metric, result['top1']                           # last epoch, not the best (no val selection)
            if result.get('top1_halves'):                                # two disjoint halves of the evaluation set:
                h1, h2 = result['top1_halves']                           # var(top1) ~ (h1 - h2)^2 / 4
                yield m, s, f'evalvar:{metric}', (h1 - h2) ** 2 / 4
    elif step.part == 'entropy':
        for (m, s), r in by_label(step):
            yield m, s, 'cls_entropy_ratio', r['cls'][-1] / r['max_entropy']      # last block, 1 = uniform
            yield m, s, 'patch_entropy_ratio', r['patch'][-1] / r['max_entropy']
    elif step.part == 'frequency':
        for (m, s), r in by_label(step):
            high = [layer[-1] for layer in r['relative_log_amplitude']]  # highest frequency; [0] = embedding
            yield m, s, 'hf_block0', high[1]
            yield m, s, 'hf_last', high[-1]
            yield m, s, 'hf_block0_minus_last', high[1] - high[-1]
    elif step.part == 'hessian':
        for (m, s), r in by_label(step):
            yield m, s, 'hessian_max', sum(max(b) for b in r['eigenvalues']) / len(r['eigenvalues'])


def collect(steps, cfg):
    """-> {method: {metric: {seed: value}}} from every finished step, plus per-seed derived metrics."""
    runs = {}
    for step in steps:
        if os.path.exists(step.done):
            for m, s, metric, value in parse(step, cfg):
                runs.setdefault(m, {}).setdefault(metric, {})[s] = value
    for metrics in runs.values():
        for task in cfg['tasks']:
            # Selective Aggregation gain, raw vs raw as Beyond [cls] (same probe run, same features).
            cls, sa = metrics.get(f'clsraw_{task}', {}), metrics.get(f'abmilp_{task}', {})
            gain = {s: sa[s] - cls[s] for s in cls if s in sa}
            if gain:
                metrics[f'sa_gain_{task}'] = gain
        for k in [k for k in metrics if k.startswith('probe_seed:')]:   # probe seed 0 is the main run of seed 0
            base = k.split(':', 1)[1]
            if 0 in metrics.get(base, {}):
                metrics[k][0] = metrics[base][0]
    return runs


# ----------------------------------------------------------------------------------------------
# Claims: the published statement, the figure behind it, and how it is measured here.

def mean_sd(values):
    v = list(values)
    m = sum(v) / len(v)
    return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else None)


# (claim, published figure, published gap, method a, method b or None, metric, expectation). The measured
# value is mean(a) - mean(b) (or mean(a) alone), and '>0' / '<0' / '>0.9' / 'not<0' is what the claim
# says of it. The MFF rows come twice: against `mae_control` (MAE with MFF's crop and weight-decay
# rule: the fusion alone, the paper's claim) and against plain MAE (the recipes as published).
FUSION_ALONE, AS_PUBLISHED = "vs MAE with MFF's recipe: the fusion alone", 'vs MAE: the recipes as published'
CLAIMS = [
    *[row for ref, how in (('mae_control', FUSION_ALONE), ('mae', AS_PUBLISHED)) for row in [
        (f'MFF-MAE > MAE, linear probe [cls], semantic task ({how})',
         'IN-1k ViT-B 300 ep: 61.5 -> 63.3 (+1.8); MFF Tab. 1', 1.8, 'mff_mae', ref, 'cls_{sem}', '>0'),
        (f'MFF-MAE > MAE, low-shot fine-tuning 1% ({how})', '41.4 -> 43.7 (+2.3); MFF Tab. 1', 2.3, 'mff_mae', ref,
         'lowshot_1%', '>0'),
        (f'MFF-MAE > MAE, low-shot fine-tuning 10% ({how})', '70.5 -> 71.4 (+0.9); MFF Tab. 1', 0.9, 'mff_mae', ref,
         'lowshot_10%', '>0'),
        (f'MFF-MAE > MAE, full fine-tuning ({how})', '82.8 -> 83.3 (+0.5); MFF Tab. 1', 0.5, 'mff_mae', ref,
         'finetune', '>0'),
        (f"fusion lowers the last layer's high frequency ({how})", 'MFF Fig. 4', None, 'mff_mae', ref, 'hf_last',
         '<0'),
        (f'fusion lowers the Hessian max eigenvalue ({how})', 'MFF Fig. 5', None, 'mff_mae', ref, 'hessian_max',
         '<0')]],
    ('shallowest fusion weight grows in training (w_0 - 1/levels)', 'grows over training; MFF Figs. 1, 6, 8', None,
     'mff_mae', None, 'fusion_w0_gain', '>0'),
    ('shallow layers carry more high frequency (block 0 - last, MAE)', 'MFF Fig. 2', None, 'mae', None,
     'hf_block0_minus_last', '>0'),
    ('Selective Aggregation > [cls], raw vs raw (abmilp - cls, MAE)',
     'MAE ViT-B IN-1k: 67.8 -> 71.6 (+3.8); Beyond [cls]', 3.8, 'mae', None, 'sa_gain_{sem}', '>0'),
    ('[cls] attention near uniform (entropy / ln L, last block, MAE)', 'near ln L; Beyond [cls]', None, 'mae', None,
     'cls_entropy_ratio', '>0.9'),
    ('PiLaMIM > MAE on the semantic task ([cls] probe)', 'IN-1k 61.1 -> 69.2 (+8.1); PiLaMIM Tab. 1', 8.1, 'pilamim',
     'mae', 'cls_{sem}', '>0'),
    ('PiLaMIM keeps the low-level task ([cls] probe, count)', 'Clevr/Count 76.6 -> 83.8 (+7.2); PiLaMIM Tab. 1', 7.2,
     'pilamim', 'mae', 'cls_{low}', 'not<0'),
    ("PixMIM > MAE, linear probe [cls] (vs MAE with PixMIM's crop and weight-decay rule: the target alone)",
     '800 ep: 65.6 -> 67.2 (+1.6); MFF Tab. 1', 1.6, 'pixmim', 'mae_control', 'cls_{sem}', '>0'),
    (f'PixMIM > MAE, linear probe [cls] ({AS_PUBLISHED})', '800 ep: 65.6 -> 67.2 (+1.6); MFF Tab. 1', 1.6, 'pixmim',
     'mae', 'cls_{sem}', '>0'),
    ('MFF-PixMIM > PixMIM, linear probe [cls]', '800 ep: 67.2 -> 68.2 (+1.0); MFF Tab. 1', 1.0, 'mff_pixmim', 'pixmim',
     'cls_{sem}', '>0'),
]


def verdict(value, se, n, expect, gap=None):
    """|value - threshold| >= 2 SE on the claimed side: holds; on the other side: does not hold; else within
    noise, and when 2 SE exceeds the published gap the study is too small to have seen that gap."""
    op, t = ('not<', float(expect[4:])) if expect.startswith('not<') else (expect[0], float(expect[1:]))
    if n < 2:
        agrees = value < t if op == '<' else value >= t if op == 'not<' else value > t
        return f"one seed, no SE: the sign {'agrees with' if agrees else 'is against'} the claim"
    z = (value - t) / se if se > 0 else math.copysign(math.inf, value - t) if value != t else 0.
    if op == 'not<':                                                     # only a significant drop refutes it
        return 'does not hold' if z <= -2 else 'holds (no significant loss)'
    z = z if op == '>' else -z
    if abs(z) < 2 and gap is not None:
        return 'within noise' + (': the study is too small to see the published gap' if 2 * se > gap
                                 else ', though the published gap would have shown')
    return 'holds' if z >= 2 else 'does not hold' if z <= -2 else 'within noise'


def claims(runs, cfg):
    """One row per claim; the SE of a difference is sqrt(sd_a^2/n_a + sd_b^2/n_b) over seeds (ddof 1)."""
    sem, low = cfg['tasks'][0], (cfg['tasks'] + ('count',))[1]          # a folder has no count task
    rows = []
    for text, published, gap, a, b, metric, expect in CLAIMS:
        metric = metric.format(sem=sem, low=low)
        groups = [runs.get(m, {}).get(metric) for m in (a, b) if m]
        row = dict(claim=text, published=published, gap=gap, metric=metric, methods=[m for m in (a, b) if m],
                   expect=expect, value=None, se=None, seeds=0, verdict='not measured')
        if all(groups):
            stats = [mean_sd(g.values()) for g in groups]
            ns = [len(g) for g in groups]
            value = stats[0][0] - (stats[1][0] if b else 0.)
            se = math.sqrt(sum(sd ** 2 / n for (_, sd), n in zip(stats, ns))) if min(ns) > 1 else None
            row.update(value=value, se=se, seeds=min(ns), verdict=verdict(value, se, min(ns), expect, gap))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Reports: results.json, results.md, figures/.

def fmt(v, sd=None):
    number = lambda x: f'{x:.2f}' if abs(x) >= 1 else f'{x:.3g}'        # noqa: E731
    return '-' if v is None else number(v) + ('' if sd is None else f' ± {number(sd)}')


def table(runs, metrics):
    metrics = [k for k in metrics if any(k in r for r in runs.values())]
    if not metrics:
        return []
    lines = ['| method | ' + ' | '.join(metrics) + ' |', '|---' * (len(metrics) + 1) + '|']
    for m, r in runs.items():
        cells = [fmt(*mean_sd(r[k].values())) if k in r else '-' for k in metrics]
        lines.append(f'| {NAMES[m]} | ' + ' | '.join(cells) + ' |')
    return lines + ['']


def noise(runs, cfg):
    """Where the spread over pre-training seeds comes from, per accuracy metric (standard deviations, points):
    total (pooled over methods), evaluation (from the two halves of each evaluation set), probe (the same
    checkpoint probed with other seeds; 0 for the deterministic L-BFGS probe and k-NN), pre-training (the rest)."""
    pooled = lambda variances: math.sqrt(sum(variances) / len(variances)) if variances else None  # noqa: E731
    sem = cfg['tasks'][0]                        # the L-BFGS probes and k-NN: no probe noise given the features
    deterministic = {f'{p}_{t}' for t in cfg['tasks'] for p in ('cls', 'mean')} | {f'knn_{sem}'}
    rows = []
    for metric in accuracy_metrics(cfg):
        total = pooled([mean_sd(r[metric].values())[1] ** 2 for r in runs.values()
                        if len(r.get(metric, {})) > 1])
        evaluation = pooled([v for r in runs.values() for v in r.get(f'evalvar:{metric}', {}).values()])
        seeds = [r[f'probe_seed:{metric}'] for r in runs.values() if len(r.get(f'probe_seed:{metric}', {})) > 1]
        probe = 0. if metric in deterministic else pooled([mean_sd(v.values())[1] ** 2 for v in seeds])
        rest = None if None in (total, evaluation, probe) else \
            math.sqrt(max(0., total ** 2 - evaluation ** 2 - probe ** 2))
        n = cfg['seeds']
        rows.append(dict(metric=metric, total=total, evaluation=evaluation, probe=probe, pretraining=rest,
                         se_difference=total and total * math.sqrt(2 / n)))
    return rows


def accuracy_metrics(cfg):
    sem = cfg['tasks'][0]
    return [f'{p}_{t}' for t in cfg['tasks'] for p in ('cls', 'mean')] + \
        [f'{p}_{sem}' for p in ('clsraw', 'abmilp', 'knn')] + ['finetune', 'lowshot_10%', 'lowshot_1%']


def report(steps, runs, rows, noise_rows, cfg, name, root, args):
    figures = os.path.join(root, 'figures')
    pngs = [p for s in steps if s.part in ANALYSES and os.path.exists(s.done)
            for p in sorted(glob.glob(os.path.join(s.out, '*.png')))]
    for p in pngs:                                                       # e.g. figures/frequency_s0_frequency.png
        os.makedirs(figures, exist_ok=True)
        shutil.copy(p, os.path.join(figures, f'{os.path.basename(os.path.dirname(p))}_{os.path.basename(p)}'))
    setting_ = {k: v for k, v in cfg.items() if k != 'quick'}
    with open(os.path.join(root, 'results.json'), 'w') as f:
        json.dump({'setting': name, 'config': setting_, 'command': ' '.join(sys.argv),
                   'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()), 'runs': runs, 'claims': rows,
                   'noise': noise_rows,
                   'steps': {s.name: {'command': shown(s.cmd), 'done': os.path.exists(s.done)} for s in steps}},
                  f, indent=1)
    accuracy = accuracy_metrics(cfg)
    analysis = ['pretrain_loss', 'fusion_w0_gain', 'hf_block0', 'hf_last', 'hessian_max', 'cls_entropy_ratio',
                'patch_entropy_ratio'] + [f'sa_gain_{t}' for t in cfg['tasks']]
    data = args.data_path or f'{cfg["pretrain_images"]} built-in images'
    lines = [f'# Reproduction, setting `{name}`', '',
             f'`{" ".join(["python reproduce.py"] + sys.argv[1:])}`, {time.strftime("%Y-%m-%d", time.gmtime())}. '
             f'ViT {cfg["model"].split("_")[2]} depth {cfg["depth"]}, {cfg["input_size"]} px, patch '
             f'{cfg["patch_size"]}, {cfg["epochs"]} epochs on {data}, up to {cfg["seeds"]} seeds.', '',
             '## Claims', '',
             '| claim | published | measured | ± SE | 2 SE | seeds | verdict |', '|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(f'| {r["claim"]} (`{r["metric"]}`) | {r["published"]} | {fmt(r["value"])} | '
                     f'{fmt(r["se"])} | {fmt(r["se"] and 2 * r["se"])} | {r["seeds"]} | {r["verdict"]} |')
    lines += ['', 'Measured: mean over seeds of the first method minus that of the second (or the mean alone). '
              'SE: sqrt(sd_a²/n_a + sd_b²/n_b), sd over seeds (ddof 1); it holds the seed-to-seed spread of '
              'pre-training and evaluation alike. Verdict: holds if the value lies at least 2 SE beyond the '
              'threshold on the claimed side, does not hold if 2 SE on the other side, within noise otherwise; '
              'with one seed the SE is unknown and no verdict is given. 2 SE: the smallest difference this '
              'study could have told from zero; where it exceeds the published gap, "within noise" says the '
              'study is too small, not that the claim fails.', '',
              '## Top-1 (%), mean ± std over seeds', ''] + table(runs, accuracy)
    lines += ['## Where the spread comes from (standard deviations, top-1 points)', '',
              '| metric | over seeds | evaluation | probe | pre-training | SE of a difference |',
              '|---|---|---|---|---|---|']
    lines += [f'| `{r["metric"]}` | {fmt(r["total"])} | {fmt(r["evaluation"])} | {fmt(r["probe"])} | '
              f'{fmt(r["pretraining"])} | {fmt(r["se_difference"])} |' for r in noise_rows
              if r['total'] is not None or r['evaluation'] is not None]
    lines += ['', 'Over seeds: the standard deviation over pre-training seeds, pooled over methods. Evaluation: '
              'from the two disjoint halves of each evaluation set, sqrt(mean((h1 - h2)² / 4)). Probe: the same '
              'seed-0 checkpoints of ' + ' and '.join(NAMES[m] for m in NOISE_METHODS) + ' probed with other '
              'seeds (0 for the L-BFGS probe and k-NN, which are deterministic given the features). '
              'Pre-training: what remains, sqrt(over seeds² - evaluation² - probe²). SE of a difference: of two '
              f'methods with {cfg["seeds"]} seeds each and this spread, sqrt(2 / seeds) x over seeds.', '']
    lines += ['## Analysis and pre-training, mean ± std over seeds', ''] + table(runs, analysis)
    lines += ['## Figures', ''] + [f'![{f}](figures/{f})' for f in sorted(os.listdir(figures))] \
        if os.path.isdir(figures) else []
    with open(os.path.join(root, 'results.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print(f'wrote {root}/results.json and results.md', flush=True)


# ----------------------------------------------------------------------------------------------
# Command line.

def main(args):
    names = {n for n in args.only | args.skip}
    unknown = names - set(PARTS) - set(NAMES) - {'analysis'}
    if unknown:
        raise InputError(f'--only/--skip name unknown parts or methods {sorted(unknown)}: use parts '
                         f'{", ".join(PARTS)}, analysis, and methods {", ".join(NAMES)}')
    for sel in (args.only, args.skip):                                   # 'analysis' = all five analyses
        if 'analysis' in sel:
            sel.discard('analysis')
            sel.update(ANALYSES)
    if args.data_path and not os.path.isdir(args.data_path):
        raise InputError(f'--data_path {args.data_path} does not exist: give an ImageNet-style folder with train/ '
                         'and val/, or omit it for the built-in data')
    cfg, name = setting(args)
    root = os.path.join(args.output_dir, name)
    steps = plan(args, cfg, root)
    print(f'setting {name}: {cfg["model"]} depth {cfg["depth"]}, {cfg["input_size"]} px, {cfg["epochs"]} epochs, '
          f'{cfg["seeds"]} seed(s); results in {root}', flush=True)
    execute(steps, args.dry_run)
    if not args.dry_run:
        everything = plan(args, cfg, root, selected=False)              # a partial rerun keeps all results
        runs = collect(everything, cfg)
        report(everything, runs, claims(runs, cfg), noise(runs, cfg), cfg, name, root, args)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    comma = lambda s: {v for v in s.split(',') if v}                     # noqa: E731
    a = p.add_argument
    a('--scale', default='laptop', choices=sorted(SCALES),
      help='laptop: ViT-tiny depth 6 at 32 px on CPU (under 2 h on 2 cores); gpu: ViT-S at 64 px, more epochs; '
           "test: the test suite's miniature")
    a('--all', action='store_true', help='every part and method of the scale, also those the laptop default leaves '
      'out because 3 seeds cannot decide them (PixMIM, MFF-PixMIM, fine-tuning, low-shot, k-NN): about 3 h 20 min')
    a('--quick', action='store_true', help='1 seed and fewer epochs (~15 min at laptop scale): a first look, no SE')
    a('--seeds', type=int, default=None, help='seeds per method (default 3); the SE needs at least 2')
    a('--epochs', type=int, default=None, help="pre-training epochs (default: the scale's)")
    a('--data_path', default='', help='ImageNet-style root with train/ and val/; empty = built-in shapes and counts')
    a('--output_dir', default='./output/reproduce', help='one folder per setting in here; rerun to resume')
    a('--only', type=comma, default=set(),
      help=f'comma list of parts ({",".join(PARTS)}, analysis) and/or methods ({",".join(NAMES)}) to run')
    a('--skip', type=comma, default=set(), help='comma list of parts and/or methods to leave out')
    a('--dry_run', action='store_true', help='print the command lines of the steps still to run, run nothing')
    return p


if __name__ == '__main__':
    run(main, get_args_parser())
