"""Tests: `python -m pytest -q test_smoke.py` (CPU, a few minutes on 2 cores).

Each test checks a behaviour that could break. Sections: MAE + MFF (layouts, masking, loss, fusion,
timm compatibility, checkpoints, resume after a kill, DDP, bad input), PixMIM and PiLaMIM (filter,
EMA target, target order, resume), probe.py (pooling, cache, frozen encoder, loading).
"""
import argparse
import builtins
import errno
import importlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image

import common
import mae_mff
import probe
from common import (InputError, SyntheticShapes, ViTEncoder, eval_transform, make_loader, patchify, random_masking,
                    save_checkpoint, train_transform, unpatchify)
from mae_mff import MaskedAutoencoder, paper_mff_layers
from pilamim import PiLaMIM, momentum_at
from pixmim_mff import PixMIM, ideal_low_pass, low_freq_target

ROOT = os.path.dirname(os.path.abspath(__file__))
# One thread per script run: 2-thread OpenMP crawls when other processes share the 2 cores.
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}
torch.set_num_threads(1)                                                 # likewise for in-process tests
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2,
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
# A fast CLI setting: 16 px images, 16 patches, tiny ViT (depth 12, width 192), 4 steps per epoch.
CLI_TINY = ['--model', 'mae_vit_tiny_patch4', '--input_size', '16',
            '--decoder_embed_dim', '32', '--decoder_depth', '1', '--decoder_num_heads', '2',
            '--batch_size', '16', '--accum_iter', '1', '--builtin_size', '64', '--epochs', '3', '--warmup_epochs', '1',
            '--blr', '1e-3', '--num_workers', '0', '--print_freq', '2']


def cli(script, *args, check=True, timeout=240):
    """Run a script as a user would; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=ENV)
    if check and proc.returncode:
        raise AssertionError(f'{script} failed:\n{proc.stdout}\n{proc.stderr}')
    return proc


def cli_args(*extra):
    return mae_mff.get_args_parser().parse_args(CLI_TINY + list(map(str, extra)))


# ---- tensor layouts and masking

def test_patchify_layout_and_inverse():
    imgs = torch.randn(2, 3, 8, 12)
    x = patchify(imgs, 4)                                                # 2 x 3 patches of 4x4x3
    assert x.shape == (2, 6, 48)
    assert torch.equal(x[0, 4].reshape(4, 4, 3), imgs[0, :, 4:8, 4:8].permute(1, 2, 0))  # channels last
    assert torch.equal(unpatchify(x, 4, 2, 3), imgs)


def test_sincos_table_matches_the_mae_formula():
    dim, g = 16, 3
    table = common.sincos_pos_embed_2d(dim, g)
    assert table.shape == (1 + g * g, dim) and not table[0].any()       # zero cls row
    omega = 1 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    row, col = 2, 1
    expect = torch.cat([torch.sin(col * omega), torch.cos(col * omega),
                        torch.sin(row * omega), torch.cos(row * omega)]).float()
    assert torch.allclose(table[1 + row * g + col], expect)


@pytest.mark.parametrize('ratio', [0.75, 0.6, 0.0])
def test_masking_keeps_exact_count_and_restores_order(ratio):
    n, L = 5, 49
    torch.manual_seed(3)
    ids_keep, mask, ids_restore = random_masking(n, L, ratio, 'cpu')
    keep = int(L * (1 - ratio))
    assert ids_keep.shape == (n, keep)
    assert torch.equal(mask.sum(1), torch.full((n,), float(L - keep)))
    assert torch.equal((mask == 0).nonzero()[:, 1].reshape(n, keep), ids_keep.sort(1).values)
    # ids_restore undoes the shuffle: shuffled order gathered with ids_restore is 0..L-1
    torch.manual_seed(3)
    shuffle = torch.argsort(torch.rand(n, L), dim=1)                     # the official recipe, same seed
    assert torch.equal(ids_keep, shuffle[:, :keep])
    assert torch.equal(torch.gather(shuffle, 1, ids_restore), torch.arange(L).expand(n, L))


# ---- model and loss

def test_official_mae_state_dict_loads_strictly_and_loss_matches_reference():
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = MaskedAutoencoder(**TINY, norm_pix_loss=True)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=0)
    block = ['norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight',
             'attn.proj.bias', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias',
             'mlp.fc2.weight', 'mlp.fc2.bias']
    official_keys = set(vit.state_dict()) | {'mask_token', 'decoder_embed.weight', 'decoder_embed.bias',
                                             'decoder_pos_embed', 'decoder_norm.weight', 'decoder_norm.bias',
                                             'decoder_pred.weight', 'decoder_pred.bias'} \
        | {f'decoder_blocks.0.{k}' for k in block}
    assert set(model.state_dict()) == official_keys
    other = MaskedAutoencoder(**TINY, norm_pix_loss=True)
    other.load_state_dict(model.state_dict(), strict=True)

    # The official forward, step by step, against ours with the same seed.
    imgs = torch.randn(3, 3, 16, 16)
    torch.manual_seed(7)
    loss, pred, mask = model(imgs, 0.75)
    torch.manual_seed(7)
    noise = torch.rand(3, 16)
    ids_shuffle = noise.argsort(1)
    ids_restore, ids_keep = ids_shuffle.argsort(1), ids_shuffle[:, :4]
    x = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, 32))
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(3, -1, -1), x], 1)
    for blk in model.blocks:
        x = blk(x)
    x = model.decoder_embed(model.norm(x))
    x_ = torch.cat([x[:, 1:], model.mask_token.repeat(3, 12, 1)], 1)
    x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, 16))
    x = torch.cat([x[:, :1], x_], 1) + model.decoder_pos_embed
    for blk in model.decoder_blocks:
        x = blk(x)
    ref_pred = model.decoder_pred(model.decoder_norm(x))[:, 1:]
    ref_mask = torch.ones(3, 16)
    ref_mask[:, :4] = 0
    ref_mask = torch.gather(ref_mask, 1, ids_restore)
    t = patchify(imgs, 4)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** .5
    ref_loss = (((ref_pred - t) ** 2).mean(-1) * ref_mask).sum() / ref_mask.sum()
    assert torch.equal(mask, ref_mask)
    assert torch.allclose(pred, ref_pred, atol=1e-6) and torch.allclose(loss, ref_loss, atol=1e-6)


def test_loss_ignores_visible_patches():
    torch.manual_seed(0)
    model = MaskedAutoencoder(**TINY)
    imgs = torch.randn(2, 3, 16, 16)
    _, pred, mask = model(imgs)
    base = model.forward_loss(imgs, pred, mask)
    visible = pred.clone()
    visible[mask == 0] += 5.0
    assert torch.allclose(model.forward_loss(imgs, visible, mask), base)
    masked = pred.clone()
    masked[mask == 1] += 5.0
    assert model.forward_loss(imgs, masked, mask) > base + 1


def test_model_names_state_the_patch_and_mff_comes_from_its_flag():
    assert MaskedAutoencoder(**TINY).mff is None                         # the constructor is official MAE's
    model = mae_mff.build_model(mae_mff.get_args_parser().parse_args(['--model', 'mae_vit_tiny_patch4',
                                                                      '--input_size', '32']))
    assert model.mff_layers == [0, 2, 4, 6, 8, 11] and model.patch_size == 4 and len(model.blocks) == 12
    defaults = mae_mff.get_args_parser().parse_args([])
    assert common.vit_arch(defaults.model) == dict(embed_dim=768, depth=12, num_heads=12, patch_size=16)  # ViT-B/16
    plain = mae_mff.build_model(mae_mff.get_args_parser().parse_args(['--mff_layers', 'none', '--model',
                                                                      'mae_vit_tiny_patch16', '--input_size', '32']))
    assert plain.mff is None and plain.patch_size == 16                  # --mff_layers none: official MAE
    assert common.vit_arch('pilamim_vit_small_patch8', depth=3) == dict(embed_dim=384, depth=3, num_heads=6,
                                                                       patch_size=8)
    for bad in ('mae_vit_tiny', 'vit_giant_patch14'):
        with pytest.raises(InputError, match='names no ViT size and patch'):
            common.vit_arch(bad)


def test_paper_mff_layers():
    assert paper_mff_layers(12) == [0, 2, 4, 6, 8, 11]
    for depth in (4, 24, 32):
        layers = paper_mff_layers(depth)
        assert layers[0] == 0 and layers[-1] == depth - 1 and layers == sorted(set(layers))


def test_fusion_weights_start_equal_and_sum_to_one():
    model = MaskedAutoencoder(**TINY, mff_layers=[0, 1, 3])
    w = model.mff.weights().detach()
    assert torch.allclose(w, torch.full((3,), 1 / 3)) and math.isclose(float(w.sum()), 1.0, rel_tol=1e-6)
    with torch.no_grad():
        model.mff.fusion_logits.copy_(torch.tensor([2.0, -1.0, 0.5]))
    w = model.mff.weights().detach()
    assert (w > 0).all() and math.isclose(float(w.sum()), 1.0, rel_tol=1e-6)


def test_mff_with_only_the_last_level_equals_plain_mae():
    torch.manual_seed(0)
    plain = MaskedAutoencoder(**TINY)
    single = MaskedAutoencoder(**TINY, mff_layers=[3])
    missing, unexpected = common.load_matching_state(single, plain.state_dict(), 'plain', strict=False)
    assert missing == ['mff.fusion_logits'] and not unexpected
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    assert torch.allclose(plain(imgs, noise=noise)[0], single(imgs, noise=noise)[0], atol=1e-6)


@pytest.mark.parametrize('kw', [dict(mff_layers=[0, 2, 3]), dict(mff_layers=[0, 3], mff_proj='mlp'),
                                dict(mff_layers=[1, 3], mff_proj='none', mff_fusion='attn'),
                                dict(mff_layers=[0, 3], mff_detach=True)])
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(kw):
    torch.manual_seed(0)
    model = MaskedAutoencoder(**TINY, norm_pix_loss=True, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    imgs, noise = torch.randn(8, 3, 16, 16), torch.rand(8, 16)
    losses = []
    for _ in range(15):
        loss = model(imgs, noise=noise)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize('detach', [False, True])
def test_detach_switch_cuts_the_gradient_into_shallow_levels(detach):
    model = MaskedAutoencoder(**TINY, mff_layers=[0, 3], mff_detach=detach)
    shallow, last = torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 5, 32, requires_grad=True)
    model.mff([shallow, last]).sum().backward()
    assert last.grad is not None and last.grad.abs().sum() > 0
    assert (shallow.grad is None) == detach


def test_encoder_loads_into_timm_with_the_same_features():
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = MaskedAutoencoder(**TINY, mff_layers=[0, 3])
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=0)
    result = vit.load_state_dict(model.state_dict(), strict=False)
    assert not result.missing_keys
    assert all(k.startswith(('decoder_', 'mask_token', 'mff.')) for k in result.unexpected_keys)
    imgs = torch.randn(2, 3, 16, 16)
    model.eval(), vit.eval()
    assert torch.allclose(vit.forward_features(imgs), model.forward_features(imgs), atol=1e-5)
    # and the other way: an encoder-only (official "pretrain") checkpoint loads into our encoder
    enc = ViTEncoder(16, 4, 3, 32, 4, 2)
    common.load_matching_state(enc, common.encoder_state_dict(vit.state_dict()), 'timm', strict=True)
    assert torch.allclose(enc.forward_features(imgs), vit.forward_features(imgs), atol=1e-5)


# ---- built-in data

def test_builtin_shapes_are_deterministic_with_two_label_kinds():
    a = common.SyntheticShapes(16, 24, seed=1)
    b = common.SyntheticShapes(16, 24, label='count', seed=1)
    pa, shape, count = a.draw(5)
    pb, _, _ = b.draw(5)
    assert pa.shape == (24, 24, 3) and (pa == pb).all()
    assert a[5][1] == shape and b[5][1] == count - 1
    assert not (a.draw(6)[0] == pa).all()
    labels = [a[i][1] for i in range(16)] + [b[i][1] for i in range(16)]
    assert set(labels) <= {0, 1, 2, 3} and len(set(labels)) > 1


# ---- checkpoints, CLI, resume, DDP

def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / 'ckpt.pth')
    common.save_checkpoint({'w': torch.ones(3)}, path)

    def dies_midway(obj, f):
        f.write(b'partial garbage')
        raise KeyboardInterrupt                                          # a kill during the write

    monkeypatch.setattr(torch, 'save', dies_midway)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint({'w': torch.zeros(3)}, path)
    assert torch.equal(common.load_checkpoint(path)['w'], torch.ones(3))


def test_cli_trains_on_builtin_data_logs_and_saves(tmp_path):
    out = tmp_path / 'run'
    proc = cli('mae_mff.py', *CLI_TINY, '--output_dir', out)
    log = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert [r['epoch'] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r['loss']) for r in log) and log[-1]['loss'] < log[0]['loss']
    assert len(log[0]['fusion_weights']) == 6 and math.isclose(sum(log[-1]['fusion_weights']), 1, rel_tol=1e-3)
    ckpt = torch.load(out / 'checkpoint-last.pth', weights_only=True)
    assert ckpt['epoch'] == 3 and ckpt['step'] == 12 and ckpt['args']['model'] == 'mae_vit_tiny_patch4'
    assert ckpt['script'] == 'mae_mff.py'                                # analyze.py rebuilds from this record
    assert (out / 'checkpoint-3.pth').exists() and 'effective batch 16' in proc.stdout


def test_kill_and_resume_auto_gives_the_same_weights(tmp_path):
    args = [*CLI_TINY, '--epochs', '4', '--builtin_size', '128', '--accum_iter', '2']
    cli('mae_mff.py', *args, '--output_dir', tmp_path / 'straight')
    out = tmp_path / 'killed'
    proc = subprocess.Popen([sys.executable, 'mae_mff.py', *args, '--output_dir', str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    log = out / 'log.jsonl'
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count('\n') >= 1) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(out / 'checkpoint-last.pth', weights_only=True)['epoch']
    assert killed_at < 4, 'the run finished before it could be killed'
    cli('mae_mff.py', *args, '--output_dir', out, '--resume', 'auto')
    a = torch.load(tmp_path / 'straight' / 'checkpoint-last.pth', weights_only=True)
    b = torch.load(out / 'checkpoint-last.pth', weights_only=True)
    assert a['epoch'] == b['epoch'] == 4 and a['step'] == b['step']
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k


DDP_SCRIPT = '''
import sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from common import init_distributed, wrap_ddp
from mae_mff import MaskedAutoencoder
rank, world, device = init_distributed()
torch.manual_seed(0)
model = MaskedAutoencoder(**{tiny!r}, norm_pix_loss=True, mff_layers=[0, 3])
g = torch.Generator().manual_seed(1)
imgs, noise = torch.randn(8, 3, 16, 16, generator=g), torch.rand(8, 16, generator=g)
part = slice(rank * 8 // world, (rank + 1) * 8 // world)
ddp = wrap_ddp(model, device, world)  # keep a reference: the reducer lives in the DDP object
loss = ddp(imgs[part], 0.75, noise=noise[part])[0]
loss.backward()
loss = loss.detach()
if world > 1:
    dist.all_reduce(loss)
    loss /= world
if rank == 0:
    torch.save({{'loss': loss, 'grads': {{n: p.grad for n, p in model.named_parameters() if p.grad is not None}}}},
               sys.argv[1])
import common
common.close_distributed()                      # else gloo may abort the exit ("terminate called ...")
'''


def test_two_process_ddp_equals_one_process(tmp_path):
    script = tmp_path / 'ddp_step.py'
    script.write_text(DDP_SCRIPT.format(root=ROOT, tiny=TINY))
    subprocess.run([sys.executable, script, tmp_path / 'one.pt'], check=True, timeout=120, env=ENV)
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                    script, tmp_path / 'two.pt'], check=True, timeout=180, capture_output=True, env=ENV)
    one, two = torch.load(tmp_path / 'one.pt'), torch.load(tmp_path / 'two.pt')
    assert torch.allclose(one['loss'], two['loss'], atol=1e-6)
    assert one['grads'].keys() == two['grads'].keys() and len(one['grads']) > 10
    for k in one['grads']:
        assert torch.allclose(one['grads'][k], two['grads'][k], atol=1e-6, rtol=1e-4), k


# ---- bad input: one line naming the problem and the fix

def test_bad_input_prints_one_line_and_exits_2(tmp_path):
    proc = cli('mae_mff.py', *CLI_TINY, '--data_path', tmp_path / 'nowhere', '--output_dir', tmp_path,
               check=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'no train/ folder' in lines[0] and 'built-in' in lines[0]


@pytest.mark.parametrize('flags, message', [
    (['--data_path', '{tmp}/nowhere'], 'no train/ folder'),
    (['--data_path', '{tmp}/empty'], 'holds no images'),
    (['--mff_layers', '0,5,12'], 'must lie in 0..11'),
    (['--mff_layers', '0,5'], 'end at the last block'),
    (['--mff_layers', 'first'], 'comma list'),
    (['--batch_size', '0'], 'batch size 0 < 1'),
    (['--accum_iter', '8'], 'fewer than one optimizer step'),
    (['--resume', '{tmp}/missing.pth'], 'does not exist'),
    (['--input_size', '18'], 'not divisible by patch size'),
])
def test_bad_input_messages(tmp_path, flags, message):
    (tmp_path / 'empty' / 'train').mkdir(parents=True)
    args = cli_args(*[f.format(tmp=tmp_path) for f in flags], '--output_dir', tmp_path / 'out')
    with pytest.raises(InputError, match=message):
        mae_mff.main(args)


@pytest.mark.parametrize('workers', [0, 1])
def test_corrupt_image_is_named(tmp_path, workers):
    folder = tmp_path / 'data' / 'train' / 'a'
    folder.mkdir(parents=True)
    for i in range(16):
        Image.new('L' if i % 2 else 'P', (20, 20)).save(folder / f'ok{i}.png')  # non-RGB modes are fine
    (folder / 'broken.jpg').write_bytes(b'not a jpeg at all')
    proc = cli('mae_mff.py', *CLI_TINY, '--data_path', tmp_path / 'data', '--num_workers', workers,
               '--batch_size', '17', '--output_dir', tmp_path / 'out', check=False)
    assert proc.returncode == 2, proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert 'broken.jpg' in line and 'delete or replace' in line


def test_resume_from_another_architecture_is_refused(tmp_path):
    cli('mae_mff.py', *CLI_TINY, '--epochs', '1', '--output_dir', tmp_path)
    with pytest.raises(InputError, match='another architecture'):
        mae_mff.main(cli_args('--model', 'mae_vit_small_patch4', '--resume', 'auto', '--output_dir', tmp_path))
    with pytest.raises(InputError, match='does not match'):
        mae_mff.main(cli_args('--mff_layers', 'none', '--resume', 'auto', '--output_dir', tmp_path))
    official = {'model': torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)['model'],
                'optimizer': {}, 'epoch': 0, 'args': argparse.Namespace(model='mae_vit_tiny_patch16')}
    torch.save(official, tmp_path / 'official.pth')                      # official MAE layout: no 'step'
    with pytest.raises(InputError, match='not a training checkpoint of these scripts'):
        mae_mff.main(cli_args('--resume', tmp_path / 'official.pth', '--output_dir', tmp_path))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cli('mae_mff.py', *CLI_TINY, '--epochs', '1', '--output_dir', tmp_path)
    good = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    proc = cli('mae_mff.py', *CLI_TINY, '--lr', '1e35', '--output_dir', tmp_path, '--resume', 'auto',
               check=False)
    assert proc.returncode == 2 and 'non-finite loss at step' in proc.stderr, proc.stderr
    after = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    assert after['epoch'] == 1
    assert all(torch.equal(good['model'][k], after['model'][k]) for k in good['model'])


# ==============================================================================================
# PixMIM and PiLaMIM

# One thread: on a small shared CPU, thread sync costs far more than these tiny matmuls gain (~10x).
torch.set_num_threads(1)
MEAN = torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)
METHOD_TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
            decoder_depth=1, decoder_num_heads=2)


def shifted_radius(H, W):
    """Distance of each fftshift-ed frequency bin from the filter's centre ((H-1)/2, (W-1)/2)."""
    i = torch.arange(H) - (H - 1) / 2
    j = torch.arange(W) - (W - 1) / 2
    return (i[:, None] ** 2 + j[None] ** 2).sqrt()


# ---------------------------------------------------------------------------------------------- PixMIM

def test_low_pass_keeps_dc_and_removes_energy_beyond_radius():
    S, r = 32, 6.
    v, u = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing='ij')
    low = 0.5 + 0.2 * torch.cos(2 * math.pi * 2 * u / S)                 # frequency 2: inside r
    high = 0.1 * torch.cos(2 * math.pi * 10 * v / S)                     # frequency 10: outside r
    x = (low + high).expand(2, 3, S, S)
    out = ideal_low_pass(x, r)
    spec_in = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
    spec_out = torch.fft.fftshift(torch.fft.fft2(out), dim=(-2, -1))
    dc = (S // 2, S // 2)
    assert torch.allclose(spec_out[..., dc[0], dc[1]], spec_in[..., dc[0], dc[1]], rtol=1e-5)   # DC kept
    beyond = shifted_radius(S, S) > r + 1
    assert (spec_in.abs() ** 2)[..., beyond].sum() > 1                   # there was high energy ...
    assert (spec_out.abs() ** 2)[..., beyond].sum() < 1e-6 * (spec_out.abs() ** 2).sum()        # ... gone
    assert torch.allclose(out, low.expand_as(out), atol=1e-5)            # low band untouched
    # A natural-ish image: energy beyond the radius drops by orders of magnitude.
    img = torch.rand(1, 3, S, S).cumsum(-1).cumsum(-2)
    img = img / img.amax()
    e_in = (torch.fft.fftshift(torch.fft.fft2(img), dim=(-2, -1)).abs() ** 2)[..., beyond].sum()
    e_out = (torch.fft.fftshift(torch.fft.fft2(ideal_low_pass(img, r)), dim=(-2, -1)).abs() ** 2)[..., beyond].sum()
    assert e_out < 1e-2 * e_in


def test_full_radius_returns_input():
    imgs = (torch.rand(2, 3, 16, 16) - MEAN) / STD                       # normalised [0, 1] images
    assert torch.allclose(low_freq_target(imgs, radius=100.), imgs, atol=1e-5)


def test_target_in_normalised_space_and_used_by_loss():
    x01 = torch.rand(2, 3, 16, 16)
    imgs = (x01 - MEAN) / STD
    expected = (ideal_low_pass(x01, 3.) - MEAN) / STD                     # filter in [0, 1], re-normalise
    target = low_freq_target(imgs, 3.)
    assert not target.requires_grad
    assert torch.allclose(target, expected, atol=1e-5)
    torch.manual_seed(0)
    model = PixMIM(lpf_radius=3., **METHOD_TINY, norm_pix_loss=True, mff_layers=[0, 1])
    plain = MaskedAutoencoder(**METHOD_TINY, norm_pix_loss=True, mff_layers=[0, 1])
    plain.load_state_dict(model.state_dict())                            # same weights, same keys
    assert torch.allclose(model.reconstruction_target(imgs), expected, atol=1e-5)
    torch.manual_seed(1)
    loss, pred, mask = model(imgs, 0.75)
    ref = common.masked_mse(pred, common.pixel_targets(expected, 4, True), mask)
    torch.manual_seed(1)
    assert torch.allclose(loss, ref, atol=1e-6) and not torch.allclose(loss, plain(imgs, 0.75)[0])


# ---------------------------------------------------------------------------------------------- PiLaMIM

def tiny_pilamim(**kw):
    torch.manual_seed(0)
    return PiLaMIM(**{**METHOD_TINY, **kw})


def test_target_starts_as_copy_and_ema_math():
    model = tiny_pilamim()
    ctx = common.encoder_state_dict(model.state_dict())
    tgt = model.target_encoder.state_dict()
    assert ctx.keys() == tgt.keys() and all(torch.equal(ctx[k], tgt[k]) for k in ctx)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    before_t = {k: v.clone() for k, v in model.target_encoder.state_dict().items()}
    ctx = {k: v.clone() for k, v in common.encoder_state_dict(model.state_dict()).items()}
    model.update_target(0.9)
    after_t = model.target_encoder.state_dict()
    for k in before_t:
        assert torch.allclose(after_t[k], 0.9 * before_t[k] + 0.1 * ctx[k], atol=1e-6), k
    assert common.encoder_state_dict(model.state_dict()).keys() == ctx.keys()   # probe sees the context encoder


def test_momentum_schedule():
    assert momentum_at(0, 100) == pytest.approx(0.996)
    assert momentum_at(50, 100) == pytest.approx(0.998)
    assert momentum_at(100, 100) == pytest.approx(1.0)


def test_target_encoder_gets_no_gradient():
    model = tiny_pilamim()
    loss = model(torch.randn(2, 3, 16, 16))[0]
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.target_encoder.parameters())
    assert model.blocks[0].attn.qkv.weight.grad is not None
    opt_params = {id(p) for g in common.param_groups(model, 0.05, 'all') for p in g['params']}
    assert not opt_params & {id(p) for p in model.target_encoder.parameters()}


class Oracle(nn.Module):
    """Stands in for the latent decoder: returns fixed 'perfect' predictions in the original order."""

    def __init__(self, pred):
        super().__init__()
        self.pred = pred

    def forward(self, x, ids_restore):
        return self.pred


def per_patch_target_encoder(model):
    """Zero every residual branch of the target encoder: its output at patch i depends on patch i only."""
    with torch.no_grad():
        for blk in model.target_encoder.blocks:
            for lin in (blk.attn.proj, blk.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    enc = model.target_encoder
    return lambda imgs: enc.norm(enc.embed(imgs))                         # (N, 1 + L, D), patch i at i + 1


def test_latent_targets_paired_with_the_same_patches():
    model = tiny_pilamim()
    truth = per_patch_target_encoder(model)
    imgs = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        oracle = truth(imgs)
    model.latent_decoder = Oracle(oracle)
    _, _, _, (_, l_lat, l_cls) = model(imgs)
    assert l_lat.item() < 1e-10 and l_cls.item() < 1e-10                 # perfect predictor -> zero loss
    # Controls: the test notices a pairing with other patches, or the public code's shuffled targets.
    model.latent_decoder = Oracle(torch.cat([oracle[:, :1], oracle[:, 1:].roll(1, dims=1)], dim=1))
    assert model(imgs)[3][1].item() > 1e-2
    model.latent_decoder = Oracle(oracle)
    unshuffled = model.target_features
    model.target_features = lambda x: (lambda t: torch.cat(
        [t[:, :1], t[:, 1:][:, torch.randperm(t.shape[1] - 1)]], dim=1))(unshuffled(x))
    assert model(imgs)[3][1].item() > 1e-2


def test_decoder_returns_original_patch_order():
    model = tiny_pilamim(decoder_depth=0)                                 # decoder = embed + pos + head
    dec = model.latent_decoder
    x = torch.randn(2, 1 + 4, 32)
    ids_keep, _, ids_restore = common.random_masking(2, 16, 0.75, 'cpu')
    out = dec(x, ids_restore)                                             # (2, 17, 32)
    for n in range(2):
        cls = dec.decoder_pred(dec.decoder_embed(x[n, 0]) + dec.decoder_pos_embed[0, 0])    # cls: position row 0
        assert torch.allclose(out[n, 0], cls, atol=1e-5)
        for k in range(4):
            pos = ids_keep[n, k] + 1
            ref = dec.decoder_pred(dec.decoder_embed(x[n, k + 1]) + dec.decoder_pos_embed[0, pos])  # no norm
            assert torch.allclose(out[n, pos], ref, atol=1e-5)


def test_decoder_gives_the_cls_token_a_position():
    dec = tiny_pilamim().latent_decoder                                   # one block: attention mixes tokens
    assert dec.decoder_pos_embed.shape == (1, 17, 32) and dec.decoder_pos_embed.requires_grad
    assert 0.015 < dec.decoder_pos_embed.std() < 0.025                    # trunc_normal 0.02, cls row included
    x = torch.randn(2, 1 + 4, 32)
    _, _, ids_restore = common.random_masking(2, 16, 0.75, 'cpu')
    with torch.no_grad():
        out = dec(x, ids_restore)[:, 0]
        dec.decoder_pos_embed[:, 0] += 1.
        assert (dec(x, ids_restore)[:, 0] - out).abs().max() > 1e-2     # the cls output reads its position


def test_analyze_reads_pilamim_checkpoints_from_before_the_decoder_cls_position():
    model = tiny_pilamim()
    with torch.no_grad():
        for dec in (model.pixel_decoder, model.latent_decoder):
            dec.decoder_pos_embed[:, 0] = 0.                              # what the old decoders did: no cls position
    state = model.state_dict()
    old = {k: v[:, 1:] if k.endswith('decoder_pos_embed') else v for k, v in state.items()}   # (1, L, d) there
    new = analyze.current_record({'model': old, 'args': {}, 'script': 'pilamim.py'})['model']
    assert new.keys() == state.keys() and all(torch.equal(new[k], state[k]) for k in state)
    assert analyze.current_record({'model': state, 'args': {}, 'script': 'pilamim.py'})['model'] is state   # new ones


def test_pilamim_init_follows_the_public_code():
    """PyTorch's default layers (kaiming-uniform, |w| <= 1/sqrt(fan_in), non-zero biases), not MAE's xavier
    (bound sqrt(6 / (fan_in + fan_out)), larger for every layer picked here; zero biases)."""
    def layers(m):          # patch conv (fan_in 48, fan_out 32), qkv (fan_out 3 fan_in, no bias), an MLP, the heads
        return [m.patch_embed.proj, m.blocks[0].attn.qkv, m.blocks[1].mlp.fc1, m.target_encoder.blocks[1].attn.qkv,
                m.pixel_decoder.decoder_blocks[0].attn.qkv, m.latent_decoder.decoder_embed,
                m.pixel_decoder.decoder_pred]
    public, mae = tiny_pilamim(), tiny_pilamim(init='mae')
    assert importlib.import_module('pilamim').get_args_parser().parse_args([]).init == 'public'
    for layer in layers(public):
        w, bound = layer.weight.flatten(1), layer.weight[0].numel() ** -.5
        assert 0.9 * bound < w.abs().max() <= bound and (layer.bias is None or layer.bias.abs().min() > 0), layer
    for layer in layers(mae):                                             # the control: xavier fails the bound
        assert layer.weight.abs().max() > layer.weight[0].numel() ** -.5, layer
        assert layer.bias is None or isinstance(layer, nn.Conv2d) or not layer.bias.any(), layer  # MAE: conv bias default
    for model in (public, mae):
        ctx, tgt = common.encoder_state_dict(model.state_dict()), model.target_encoder.state_dict()
        assert all(torch.equal(ctx[k], tgt[k]) for k in tgt)             # the target starts as a copy
        assert torch.equal(model.pos_embed[0], common.sincos_pos_embed_2d(32, 4))   # fixed sin-cos kept


def test_no_cls_loss_switch():
    imgs = torch.randn(2, 3, 16, 16)
    torch.manual_seed(3)
    loss, pred, mask, (l_pix, l_lat, l_cls) = tiny_pilamim()(imgs)
    assert l_cls.item() > 0 and torch.allclose(loss, l_pix + l_lat + l_cls)
    assert torch.allclose(l_pix, common.masked_mse(pred, common.patchify(imgs, 4), mask))   # pred: the pixel branch
    torch.manual_seed(3)
    loss, _, _, (l_pix, l_lat, l_cls) = tiny_pilamim(cls_loss=False)(imgs)
    assert l_cls.item() == 0 and torch.allclose(loss, l_pix + l_lat)


# ---------------------------------------------------------------------------------------------- METHOD_CLI

METHOD_CLI = ['--model', 'mae_vit_tiny_patch4', '--input_size', '16', '--decoder_embed_dim', '32',
       '--decoder_depth', '1', '--decoder_num_heads', '2', '--builtin_size', '32', '--batch_size', '16',
       '--accum_iter', '1', '--epochs', '2', '--warmup_epochs', '1', '--num_workers', '0', '--save_freq', '1',
       '--print_freq', '1']


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]


def method_cli(script, out, *extra):
    """The script as a user runs it (a fresh process)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *METHOD_CLI, '--output_dir', str(out), *extra],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    return read_log(out)


def in_process(script, out, *extra):
    """Same run without the interpreter start-up (keeps the file fast)."""
    module = importlib.import_module(script[:-3])
    module.main(module.get_args_parser().parse_args([*METHOD_CLI, '--output_dir', str(out), *extra]))
    return read_log(out)


@pytest.mark.parametrize('script,extra', [('pixmim_mff.py', ['--mff_layers', '0,11']),
                                          ('pilamim.py', ['--no_cls_loss', '--latent_target', 'layernorm'])])
def test_cli_train_and_exact_resume(tmp_path, script, extra):
    full = in_process(script, tmp_path / 'full', *extra)                 # 2 epochs straight
    resumed_dir = tmp_path / 'resumed'
    resumed_dir.mkdir()
    shutil.copy(tmp_path / 'full' / 'checkpoint-1.pth', resumed_dir / 'checkpoint-last.pth')  # "killed" after 1
    resumed = method_cli(script, resumed_dir, '--resume', 'auto', *extra)
    assert [r['epoch'] for r in resumed] == [2] and full[-1]['step'] == resumed[-1]['step'] == 4
    a = torch.load(tmp_path / 'full' / 'checkpoint-2.pth', weights_only=True)
    b = torch.load(resumed_dir / 'checkpoint-2.pth', weights_only=True)
    for k in a['model']:                                                  # target encoder + EMA position too
        assert torch.allclose(a['model'][k], b['model'][k], atol=1e-6), k
    assert full[-1]['loss'] == pytest.approx(resumed[-1]['loss'], rel=1e-5)
    if script == 'pilamim.py':
        assert any(k.startswith('target_encoder.') for k in a['model'])
        assert resumed[-1]['cls'] == 0 and full[-1]['ema_momentum'] == resumed[-1]['ema_momentum'] == 1.0
    enc = common.ViTEncoder(16, 4, embed_dim=192, depth=12, num_heads=3,  # what probe.py does
                            qkv_bias=script != 'pilamim.py')              # PiLaMIM: no qkv bias
    common.load_matching_state(enc, common.encoder_state_dict(a['model']), 'checkpoint')


@pytest.mark.parametrize('script,flags,words', [('pixmim_mff.py', ['--lpf_radius', '-1'], 'lpf_radius'),
                                                ('pilamim.py', ['--accum_iter', '8'], 'accum_iter')])
def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys, script, flags, words):
    module = importlib.import_module(script[:-3])
    monkeypatch.setattr(sys, 'argv', [script, *METHOD_CLI, '--output_dir', str(tmp_path), *flags])
    with pytest.raises(SystemExit) as e:
        common.run(module.main, module.get_args_parser(), module.PRESETS)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and words in err


# ==============================================================================================
# probe.py

PROBE_TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2)


def probe_args(*flags):
    """probe.py's flags with its laptop preset (built-in data), resolved as main resolves them."""
    args = common.parse_args(probe.get_args_parser(), probe.PRESETS, ['--preset', 'laptop', *map(str, flags)])
    args.world_size = 1
    probe.resolve_recipe(args)
    return args


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    """A depth-2, width-192 MAE pre-trained for a few steps, saved in mae_mff.py's checkpoint format."""
    torch.manual_seed(0)
    model = MaskedAutoencoder(img_size=32, patch_size=4, embed_dim=192, depth=2, num_heads=3, decoder_embed_dim=64,
                              decoder_depth=1, decoder_num_heads=2, mff_layers=(0, 1))
    data = SyntheticShapes(128, 32, transform=train_transform(32))
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-3, betas=(0.9, 0.95), weight_decay=0.05)
    for imgs, _ in torch.utils.data.DataLoader(data, batch_size=32):
        loss = model(imgs)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = str(tmp_path_factory.mktemp('pre') / 'checkpoint-last.pth')
    save_checkpoint({'model': model.state_dict(), 'optimizer': opt.state_dict(), 'epoch': 1, 'step': 4,
                     'args': {'model': 'mae_vit_tiny_patch4', 'input_size': 32}}, path)
    return path


def test_abmilp_attention_is_a_distribution_over_patches_only():
    torch.manual_seed(0)
    encoder = ViTEncoder(**PROBE_TINY).eval()
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = probe.features(encoder, imgs, 'abmilp', 1, False)      # (N, L, D): cls excluded
        assert torch.equal(tokens, encoder.forward_blocks(encoder.embed(imgs), [1])[-1][:, 1:])
        pool = probe.AbMILPool(64, depth=2)
        for p in pool.parameters():                                      # non-trivial scores
            torch.nn.init.normal_(p, std=0.5)
        a = pool.attention(tokens)
    assert a.shape == (3, encoder.num_patches)
    assert (a > 0).all() and torch.allclose(a.sum(1), torch.ones(3))
    assert a.std(1).min() > 0                                            # not uniform: it selects
    assert torch.allclose(pool(tokens), (a[..., None] * tokens).sum(1), atol=1e-6)
    assert isinstance(probe.AbMILPool(64).score[0], torch.nn.Linear) and len(probe.AbMILPool(64).score) == 1


def test_cached_and_uncached_paths_give_the_same_features():
    torch.manual_seed(0)
    encoder = ViTEncoder(**PROBE_TINY).eval()
    data = SyntheticShapes(40, 32, transform=eval_transform(32))
    loader = make_loader(data, 16, 0, 1, 0, train=False)[0]
    for pool in ('cls', 'mean', 'abmilp'):
        args = probe_args('--checkpoint', 'x', '--pool', pool, '--layer', '0', '--batch_size', '16')
        cache_x, cache_y = probe.extract(encoder, loader, pool, 0, args.feature_norm == 'on', torch.device('cpu'))
        cached = list(probe.batches(encoder, (cache_x, cache_y), args, torch.device('cpu'), shuffle=False))
        fresh = list(probe.batches(encoder, loader, args, torch.device('cpu'), shuffle=False))
        assert len(cached) == len(fresh) == 3
        for (xc, yc), (xf, yf) in zip(cached, fresh):
            assert torch.equal(yc, yf) and torch.allclose(xc, xf, atol=1e-6)


@pytest.mark.parametrize('pool', ['cls', 'abmilp'])
def test_encoder_is_untouched_by_probing(pool, tmp_path):
    torch.manual_seed(0)
    encoder = ViTEncoder(**PROBE_TINY).requires_grad_(False).eval()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    args = probe_args('--checkpoint', 'x', '--pool', pool, '--epochs', '2', '--batch_size', '16',
                      '--output_dir', str(tmp_path), '--layer', '1')
    train = SyntheticShapes(32, 32, transform=common.ImageView('rrc', 32, scale=(0.08, 1.)))  # probe.py's --aug view
    val = SyntheticShapes(16, 32, seed=1, transform=eval_transform(32))
    val_src = make_loader(val, 16, 0, 1, 0, train=False)[0]
    # re-encoding path (augmented): the encoder runs inside every training step
    probe.train_probe(encoder, make_loader(train, 16, 0, 1, 0)[0], val_src, 4, args, torch.device('cpu'))
    # cached path
    cache = probe.extract(encoder, make_loader(train, 16, 0, 1, 0, train=False)[0], pool, 1,
                          args.feature_norm == 'on', torch.device('cpu'))
    head, history = probe.train_probe(encoder, cache, val_src, 4, args, torch.device('cpu'))
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert len(history) == 2 and head.fc.weight.grad is not None


def test_probe_beats_chance_and_writes_result(pretrained, tmp_path):
    out = str(tmp_path)
    result = probe.main(probe_args('--checkpoint', pretrained, '--builtin_size', '512', '--output_dir', out))
    assert result['method'] == 'linear' and len(result['epochs']) == 30 and result['top5'] is None  # 4 classes
    assert result['top1'] > 35, result                                   # chance 25%, 256 val images
    saved = json.load(open(os.path.join(out, 'probe_cls_block1.json')))
    assert saved['top1'] == result['top1'] and saved['best_top1'] >= saved['top1']


def test_knn_runs(pretrained, tmp_path):
    result = probe.main(probe_args('--checkpoint', pretrained, '--knn', '--pool', 'mean', '--builtin_size', '256',
                                   '--builtin_label', 'count', '--output_dir', str(tmp_path)))
    assert result['method'] == 'knn' and 0 <= result['top1'] <= 100
    assert os.path.isfile(os.path.join(str(tmp_path), 'knn_mean_block1.json'))
    scores = probe.knn_scores(torch.eye(4), torch.arange(4), torch.eye(4) + 0.01, 4, k=2)
    assert torch.equal(scores.argmax(1), torch.arange(4))             # nearest neighbour wins the vote
    with pytest.raises(InputError, match='abmilp'):
        probe_args('--checkpoint', pretrained, '--knn', '--pool', 'abmilp')


def test_probe_on_imagenet_style_folders(pretrained, tmp_path):
    for split in ('train', 'val'):
        for label, colour in (('red', (220, 30, 30)), ('blue', (30, 30, 220))):
            folder = tmp_path / 'data' / split / label
            folder.mkdir(parents=True)
            for i in range(8):
                Image.new('RGB', (40, 36), tuple(c + 3 * i for c in colour)).save(folder / f'{i}.png')
    result = probe.main(probe_args('--checkpoint', pretrained, '--data_path', str(tmp_path / 'data'), '--no_aug',
                                   '--epochs', '30', '--warmup_epochs', '3', '--blr', '30', '--batch_size', '4',
                                   '--accum_iter', '1', '--num_workers', '0', '--output_dir', str(tmp_path / 'out')))
    assert result['num_classes'] == 2 and len(result['epochs']) == 30
    assert result['top1'] == 100.0                                       # colour is trivially separable


def test_official_and_timm_format_weights_load(tmp_path):
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 32, 32)
    mae = MaskedAutoencoder(**PROBE_TINY, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2).eval()
    save_checkpoint({'model': mae.state_dict()}, str(tmp_path / 'official.pth'))   # official MAE layout
    vit = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=4, embed_dim=64,
                            depth=2, num_heads=2, num_classes=10).eval()
    save_checkpoint(vit.state_dict(), str(tmp_path / 'timm.pth'))     # bare timm state dict, with head.*
    for name, reference in (('official', mae.forward_features), ('timm', vit.forward_features)):
        path = str(tmp_path / f'{name}.pth')
        with pytest.raises(InputError, match='--num_heads'):           # width 64 is no standard size
            probe.load_encoder(path, probe_args('--checkpoint', path))
        encoder = probe.load_encoder(path, probe_args('--checkpoint', path, '--num_heads', '2'))[0]
        with torch.no_grad():
            assert torch.allclose(encoder.forward_features(imgs), reference(imgs), atol=1e-5)
        assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


def test_checkpoint_of_another_size_is_a_one_line_error(pretrained, tmp_path):
    with pytest.raises(InputError, match='another architecture'):
        probe.load_encoder(pretrained, probe_args('--checkpoint', pretrained, '--input_size', '64'))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'probe.py'), '--checkpoint', pretrained,
                           '--model', 'mae_vit_small_patch16', '--output_dir', str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'another architecture' in lines[0] and 'embed_dim 192 there, 384 asked' in lines[0]
    with pytest.raises(InputError, match='--layer 5 does not exist'):
        probe.main(probe_args('--checkpoint', pretrained, '--layer', '5', '--output_dir', str(tmp_path)))
    with pytest.raises(InputError, match='does not exist'):
        probe.load_encoder(str(tmp_path / 'missing.pth'), probe_args('--checkpoint', 'x'))


def test_token_cache_that_does_not_fit_is_refused(monkeypatch):
    encoder = ViTEncoder(**PROBE_TINY).eval()
    loader = make_loader(SyntheticShapes(8, 32), 8, 0, 1, 0, train=False)[0]
    monkeypatch.setattr(probe, 'free_memory', lambda device: 1000)
    with pytest.raises(InputError, match='--aug'):
        probe.extract(encoder, loader, 'abmilp', 1, False, torch.device('cpu'))


def quick_probe(pretrained, out, *flags):
    """probe.main on 128 built-in training images and 64 val images, 3 short epochs."""
    return probe.main(probe_args('--checkpoint', pretrained, '--builtin_size', '128', '--builtin_val_size', '64',
                                 '--batch_size', '32', '--epochs', '3', '--warmup_epochs', '1', '--output_dir', out,
                                 *flags))


def test_several_pools_share_one_encoder_pass_and_match_single_pool_runs(pretrained, tmp_path, monkeypatch):
    passes, block_output = [], probe.block_output
    monkeypatch.setattr(probe, 'block_output', lambda *a: passes.append(1) or block_output(*a))
    both = quick_probe(pretrained, tmp_path / 'both', '--pool', 'cls,abmilp')
    assert sorted(both) == ['abmilp', 'cls'] and len(passes) == 4 + 2      # 128 / 32 train + 64 / 32 val batches
    for pool in ('cls', 'abmilp'):
        alone = quick_probe(pretrained, tmp_path / pool, '--pool', pool)
        name = f'probe_{pool}_block1.json'
        saved, single = (json.load(open(tmp_path / d / name)) for d in ('both', pool))
        assert saved['top1'] == single['top1'] == alone['top1'] and saved['args']['feature_norm'] == \
            single['args']['feature_norm'] == ('off' if pool == 'abmilp' else 'on')       # auto, per pool
        assert [dict(e, epoch_s=0) for e in saved['epochs']] == [dict(e, epoch_s=0) for e in single['epochs']]
    assert sorted(os.listdir(tmp_path / 'both')) == ['log.jsonl', 'probe_abmilp_block1.json', 'probe_cls_block1.json']
    knn = quick_probe(pretrained, tmp_path / 'knn', '--knn', '--pool', 'cls,mean', '--feature_norm', 'off')
    assert knn['mean']['top1'] == quick_probe(pretrained, tmp_path / 'knn1', '--knn', '--pool', 'mean',
                                              '--feature_norm', 'off')['top1']
    assert knn['cls']['args']['feature_norm'] == 'off'                  # on/off: every pool
    for flags, words in ((['--pool', 'cls,cls'], 'names cls twice'), (['--pool', 'cls,max'], "unknown pooling 'max'"),
                         (['--pool', 'cls,mean', '--aug'], 'one pool per run, or --no_aug'),
                         (['--knn', '--pool', 'cls,abmilp'], 'cannot learn abmilp attention')):
        with pytest.raises(InputError, match=words):
            probe_args('--checkpoint', 'x', *flags)


def test_top1_halves_split_the_evaluation_set_in_dataset_order(pretrained, tmp_path, monkeypatch):
    monkeypatch.setattr(probe, 'LAMBDAS', [1e-1, 1e-2])                 # small lambdas are slow on 102 images
    assert probe.top1_halves(torch.tensor([1, 1, 0, 0, 0, 1, 1]).bool(), 1) == [pytest.approx(200 / 3), 50.]
    for flags in ([], ['--knn'], ['--solver', 'lbfgs']):                # 64 val images: halves of 32
        r = quick_probe(pretrained, tmp_path / '_'.join(flags or ['sgd']), '--pool', 'mean', *flags)
        saved = json.load(open(next((tmp_path / '_'.join(flags or ['sgd'])).glob('*_mean_block1.json'))))
        assert saved['top1_halves'] == r['top1_halves'] and len(r['top1_halves']) == 2
        assert sum(r['top1_halves']) / 2 == pytest.approx(r['top1'], abs=0.01), r   # the SGD log rounds to 0.01


def blobs(n, dim=32, spread=1., seed=0):
    """n features of 4 Gaussian classes (fixed class means of norm about `spread` x sqrt(dim)), shifted and scaled."""
    means = torch.randn(4, dim, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return 3 * (spread * means[y] + torch.randn(n, dim, generator=g)) + 5, y   # standardise() undoes the scale


def test_lbfgs_probe_reaches_the_minimum_and_is_seed_free(pretrained, tmp_path, monkeypatch):
    x, y = blobs(512, spread=0.3)
    xs = probe.standardise(x.double())[0]
    assert torch.allclose(xs.mean(0), torch.zeros(32, dtype=torch.float64), atol=1e-9)
    W, b = probe.fit_logreg(xs, y, 4, 1e-3)
    lbfgs = probe.objective(xs, y, W, b, 1e-3).item()
    torch.manual_seed(0)                                                 # a reference solved another way
    W2, b2 = torch.zeros(32, 4, dtype=torch.float64, requires_grad=True), torch.zeros(4, dtype=torch.float64,
                                                                                        requires_grad=True)
    opt = torch.optim.Adam([W2, b2], lr=0.05)
    for _ in range(1500):
        opt.zero_grad()
        loss = probe.objective(xs, y, W2, b2, 1e-3)
        loss.backward()
        opt.step()
    assert lbfgs <= probe.objective(xs, y, W2, b2, 1e-3).item() + 1e-8           # of about 0.34
    separable = probe.logreg_probe(blobs(256, spread=3.), blobs(64, spread=3.), 4)
    assert separable['top1'] == 100.0 and separable['solver'] == 'lbfgs'
    # seed-free on a real checkpoint: the probe seed changes nothing when the images are the same
    monkeypatch.setattr(probe, 'LAMBDAS', [1e-1, 1e-2, 1e-3])            # small lambdas are slow on 102 images
    runs = [quick_probe(pretrained, tmp_path / str(seed), '--solver', 'lbfgs', '--seed', seed, '--builtin_seed', 0)
            for seed in (0, 1)]
    assert runs[0]['top1'] == runs[1]['top1'] and runs[0]['heldout_top1'] == runs[1]['heldout_top1']
    assert 'epochs' not in runs[0] and runs[0]['top1'] > 25
    for flags, words in ((['--pool', 'abmilp'], 'trained by SGD'), (['--pool', 'cls,abmilp'], 'trained by SGD'),
                         (['--aug'], 'add --no_aug')):
        with pytest.raises(InputError, match=words):
            probe_args('--checkpoint', 'x', '--solver', 'lbfgs', *flags)


def test_lbfgs_lambda_is_the_best_on_the_held_out_split(monkeypatch):
    # 160 images to fit 64 noisy dimensions: an unregularised fit overfits, a strong L2 generalises
    train, val = blobs(200, dim=64, spread=0.3, seed=1), blobs(400, dim=64, spread=0.3, seed=2)
    r = probe.logreg_probe(train, val, 4)
    heldout = {float(k): v for k, v in r['heldout_top1'].items()}
    assert sorted(heldout) == sorted(probe.LAMBDAS) and r['lambda'] in heldout
    assert r['lambda'] == max(k for k, v in heldout.items() if v == max(heldout.values()))   # best; ties: stronger
    assert heldout[r['lambda']] > heldout[1e-6], heldout
    monkeypatch.setattr(probe, 'LAMBDAS', [1e-6])                        # no choice: the nearly unregularised fit
    assert probe.logreg_probe(train, val, 4)['top1'] < r['top1']


def test_builtin_seed_and_val_size_fix_the_evaluation_images(tmp_path):
    base = dict(data_path='', builtin_size=64, input_size=16, builtin_label='shape', gpu_decode=False)
    old = common.build_dataset(argparse.Namespace(**base, seed=3), 'val', None)       # a script without the flags
    assert len(old) == 256 and old.seed == 7
    views = [common.build_dataset(argparse.Namespace(**base, seed=s, builtin_seed=5, builtin_val_size=40), split, None)
             for s in (0, 1) for split in ('train', 'val')]
    assert [(len(d), d.seed) for d in views] == [(64, 10), (40, 11)] * 2
    assert (views[1][7][0].tobytes(), views[1][7][1]) == (views[3][7][0].tobytes(), views[3][7][1])  # same images
    args = finetune.get_args_parser().parse_args(['--builtin_seed', '2', '--builtin_val_size', '300'])
    assert (args.builtin_seed, args.builtin_val_size) == (2, 300)        # finetune.py has them too


@pytest.mark.parametrize('flags,words', [(['--builtin_val_size', '0'], '--builtin_val_size 0 < 1'),
                                         (['--builtin_seed', '-1'], '--builtin_seed -1 is negative')])
def test_bad_builtin_flags_are_one_line_errors(tmp_path, monkeypatch, capsys, flags, words):
    fails_in_one_line('probe.py', ['--checkpoint', tmp_path / 'none.pth', '--output_dir', tmp_path / 'out', *flags],
                      monkeypatch, capsys, words)


# ---------------------------------------------------------------------------------------------- REFERENCE DEFAULTS (issue 9)

def decayed_names(model, rule):
    groups = common.param_groups(model, 0.05, rule)
    decayed = {id(p) for g in groups if g['weight_decay'] > 0 for p in g['params']}
    grouped = [id(p) for g in groups for p in g['params']]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(id(p) for p in trainable)           # each trainable param exactly once
    return {n for n, p in model.named_parameters() if id(p) in decayed}


def test_weight_decay_groups_follow_each_reference():
    mff = MaskedAutoencoder(**TINY, mff_layers=[0, 3])
    names = {n for n, p in mff.named_parameters() if p.requires_grad}
    mmp = decayed_names(mff, 'mmpretrain')
    assert 'mff.fusion_logits' in mmp                                     # decayed as in mmpretrain's run
    assert {'blocks.0.attn.qkv.weight', 'mff.proj.0.weight', 'decoder_pred.weight', 'patch_embed.proj.weight'} <= mmp
    assert not mmp & {'cls_token', 'mask_token', 'norm.weight', 'blocks.0.norm1.weight', 'decoder_norm.weight'}
    assert not any(n.endswith('bias') for n in mmp)
    plain = MaskedAutoencoder(**TINY)
    mae = decayed_names(plain, 'mae')
    assert {'cls_token', 'mask_token', 'blocks.0.attn.qkv.weight'} <= mae  # official MAE decays the tokens
    assert not any(n.endswith('bias') or 'norm' in n for n in mae)
    assert decayed_names(mff, 'all') == names                             # PiLaMIM's code: every parameter
    with pytest.raises(InputError, match='wd_rule'):
        common.param_groups(mff, 0.05, 'timm')


@pytest.mark.parametrize('script,flags,crop,rule', [
    ('mae_mff', [], 'simple', 'mmpretrain'), ('mae_mff', ['--mff_layers', 'none'], 'rrc', 'mae'),
    ('mae_mff', ['--crop', 'rrc', '--wd_rule', 'all'], 'rrc', 'all'),     # explicit flags win
    ('pixmim_mff', [], 'simple', 'mmpretrain'), ('pixmim_mff', ['--mff_layers', 'none'], 'simple', 'mmpretrain'),
    ('pilamim', [], 'rrc', 'all')])
def test_each_method_resolves_its_reference_recipe(script, flags, crop, rule):
    module = importlib.import_module(script)
    args = module.get_args_parser().parse_args(flags)
    if script == 'mae_mff' and not flags:                                # MFF-MAE and MAE differ: resolved
        assert args.crop == args.wd_rule == 'auto'
    module.resolve_recipe(args)
    assert (args.crop, args.wd_rule) == (crop, rule)


def test_each_script_has_its_own_presets(monkeypatch):
    import pilamim
    import pixmim_mff
    for module in (pilamim, pixmim_mff):
        monkeypatch.setitem(module.PRESETS, 'short', dict(epochs=3))
        args = common.parse_args(module.get_args_parser(), module.PRESETS, ['--preset', 'short', '--blr', '1'])
        assert (args.epochs, args.blr) == (3, 1.)                        # the preset's value; explicit flags win
    with pytest.raises(SystemExit):                                      # not a preset of mae_mff.py
        common.parse_args(mae_mff.get_args_parser(), mae_mff.PRESETS, ['--preset', 'short'])


def test_simple_crop_is_bilinear_and_rrc_bicubic():
    simple, rrc = train_transform(32, 'simple').transforms, train_transform(32, 'rrc').transforms
    from torchvision.transforms import InterpolationMode, RandomCrop, RandomResizedCrop, Resize
    assert isinstance(simple[0], Resize) and simple[0].interpolation == InterpolationMode.BILINEAR
    assert isinstance(simple[1], RandomCrop) and simple[1].padding == 1 and simple[1].padding_mode == 'reflect'
    # PixMIM's 4 px at 224, scaled with the image: a shift of at most a quarter of a 4-px patch at 32 px
    assert [train_transform(n, 'simple').transforms[1].padding for n in (16, 32, 64, 224, 448)] == [0, 1, 1, 4, 8]
    assert isinstance(rrc[0], RandomResizedCrop) and rrc[0].interpolation == InterpolationMode.BICUBIC
    assert rrc[0].scale == (0.2, 1.0)
    with pytest.raises(InputError, match='--crop'):
        train_transform(32, 'auto')                                       # 'auto' must be resolved first


def test_plain_mae_prints_and_records_its_recipe(tmp_path, capsys):
    in_process('mae_mff.py', tmp_path, '--mff_layers', 'none', '--epochs', '1')
    out = capsys.readouterr().out
    assert 'recipe: MAE as the official code: crop rrc, weight decay 0.05 on the mae groups' in out
    saved = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)['args']
    assert (saved['crop'], saved['wd_rule']) == ('rrc', 'mae')


def test_fusion_weights_and_sum_stay_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    mff = mae_mff.MultiLevelFusion(32, [0, 3], 4, 2)
    with torch.no_grad():
        mff.fusion_logits.copy_(torch.tensor([0.3, -0.2]))
    levels = [torch.randn(2, 5, 32), torch.randn(2, 5, 32).bfloat16()]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = mff(levels)
        shallow = mff.proj[0](levels[0])                                  # bf16 under autocast
    w = mff.fusion_logits.double().softmax(0)
    expected = w[0] * shallow.double() + w[1] * levels[1].double()
    assert shallow.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert torch.allclose(out.double(), expected, atol=1e-6)              # bf16 weights would be off by ~1e-3


def test_low_pass_without_the_inverse_shift_is_the_same_target():
    x = torch.rand(2, 3, 16, 16)
    H = W = 16
    i, j = torch.arange(H) - (H - 1) / 2, torch.arange(W) - (W - 1) / 2
    keep = i[:, None] ** 2 + j[None] ** 2 <= 5. ** 2
    reference = torch.fft.ifft2(torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1)) * keep).abs()  # no ifftshift
    assert torch.allclose(ideal_low_pass(x, 5.), reference, atol=1e-5)


def test_pilamim_follows_the_public_code_and_still_loads_downstream(tmp_path):
    from timm.models.vision_transformer import VisionTransformer
    from pilamim import epoch_lr
    model = tiny_pilamim(img_size=32, embed_dim=64)
    keys = model.state_dict().keys()
    assert not any(k.endswith('qkv.bias') for k in keys) and not any('decoder_norm' in k for k in keys)
    assert model.pixel_decoder.decoder_pos_embed.shape == (1, 65, 32)                # cls row + 64 patches
    path = str(tmp_path / 'pilamim.pth')
    save_checkpoint({'model': model.state_dict(), 'args': {'model': 'x'}}, path)
    encoder = probe.load_encoder(path, probe_args('--checkpoint', path, '--num_heads', '2'))[0]
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=0,
                            qkv_bias=False)
    vit.load_state_dict(common.encoder_state_dict(model.state_dict()), strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    model.eval(), vit.eval()
    with torch.no_grad():
        assert torch.allclose(encoder.forward_features(imgs), model.forward_features(imgs), atol=1e-6)
        assert torch.allclose(vit.forward_features(imgs), model.forward_features(imgs), atol=1e-5)
    # Per-epoch LambdaLR of the public code: min((e + 1) / warmup, cosine over all epochs), constant in an epoch.
    args = argparse.Namespace(lr=1., min_lr=0., warmup_epochs=40, epochs=800)
    assert epoch_lr(0, args) == epoch_lr(0.99, args) == pytest.approx(1 / 40)
    assert epoch_lr(39.5, args) == pytest.approx(0.5 * (1 + math.cos(math.pi * 39 / 800)))
    assert epoch_lr(400, args) == pytest.approx(0.5)
    assert importlib.import_module('pilamim').get_args_parser().parse_args([]).lr_schedule == 'epoch'


def test_probe_features_per_reference():
    torch.manual_seed(0)
    encoder = ViTEncoder(**PROBE_TINY).eval()
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        raw = encoder.forward_blocks(encoder.embed(imgs), [1])[-1]        # (N, 1 + L, D), before the norm
        feats = {pool: probe.features(encoder, imgs, pool, 1, probe_args('--checkpoint', 'x', '--pool', pool)
                                      .feature_norm == 'on') for pool in ('cls', 'mean', 'abmilp')}
        assert torch.equal(feats['abmilp'], raw[:, 1:])                  # Beyond [cls]: raw residual stream
        assert not torch.allclose(feats['abmilp'], encoder.norm(raw)[:, 1:], atol=1e-3)
        assert torch.allclose(feats['cls'], encoder.norm(raw)[:, 0], atol=1e-6)       # MAE's probe
        assert torch.allclose(feats['mean'], encoder.norm(raw[:, 1:].mean(1)), atol=1e-6)  # MAE's global pool
        assert not torch.allclose(feats['mean'], encoder.norm(raw)[:, 1:].mean(1), atol=1e-3)
        on = probe_args('--checkpoint', 'x', '--pool', 'abmilp', '--feature_norm', 'on').feature_norm == 'on'
        assert torch.allclose(probe.features(encoder, imgs, 'abmilp', 1, on), encoder.norm(raw)[:, 1:], atol=1e-6)


def test_abmilp_depth_and_head_init_follow_the_reference():
    args = probe_args('--checkpoint', 'x', '--pool', 'abmilp')
    head = probe.ProbeHead(64, 4, 'abmilp', args.abmilp_depth)
    assert args.abmilp_depth == 1 and [type(m) for m in head.pool.score] == [nn.Linear]
    assert head.pool.score[0].weight.shape == (1, 64)
    deep = probe.AbMILPool(64, depth=3, act='relu').score
    assert [type(m) for m in deep] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    with pytest.raises(InputError, match='abmilp_depth'):
        probe.AbMILPool(64, depth=0)
    torch.manual_seed(0)
    mae_head = probe.ProbeHead(768, 1000, 'cls').fc
    assert mae_head.weight.std() < 0.011 and not mae_head.bias.any()        # trunc_normal(0.01), zero bias
    default = probe.ProbeHead(768, 1000, 'abmilp').fc                      # PyTorch's kaiming-uniform default
    assert default.weight.abs().max() <= 1 / 768 ** .5 and default.weight.std() > 0.015 and default.bias.any()


def test_probe_lr_help_and_recipe_batch():
    helptext = ' '.join(probe.get_args_parser().format_help().split())
    lr, batch, blr = map(float, re.search(r"PiLaMIM's probe: lr ([\d.]+) at batch (\d+) = blr ([\d.]+)",
                                          helptext).groups())
    assert (lr, batch) == (3, 1024) and blr == lr * 256 / batch           # PiLaMIM's absolute lr 3 at 1024
    for world, accum in ((1, 8), (8, 1)):
        args = probe.get_args_parser().parse_args(['--checkpoint', 'x', '--data_path', '/imagenet'])
        args.world_size = world
        probe.resolve_recipe(args)
        assert (args.batch_size, args.accum_iter, args.eff_batch) == (2048, accum, 16384)
        assert args.lr == pytest.approx(6.4)                              # mmpretrain's LARS lr 6.4
    args = probe_args('--checkpoint', 'x')
    assert (args.batch_size, args.accum_iter) == (256, 1)


def test_probe_accum_iter_steps_once_per_accumulation(monkeypatch, tmp_path):
    steps, make = [], probe.lars

    def counting_lars(head, args):
        opt = make(head, args)
        step = opt.step
        opt.step = lambda *a, **k: (steps.append(opt.param_groups[0]['lr']), step(*a, **k))[1]
        return opt

    monkeypatch.setattr(probe, 'lars', counting_lars)
    torch.manual_seed(0)
    encoder = ViTEncoder(**PROBE_TINY).eval()
    cache = (torch.randn(80, 64), torch.randint(0, 4, (80,)))                # 5 micro-batches of 16
    for accum, expected in ((1, 5), (2, 2)):
        steps.clear()
        args = probe_args('--checkpoint', 'x', '--epochs', '1', '--warmup_epochs', '0', '--batch_size', '16',
                          '--accum_iter', str(accum), '--output_dir', str(tmp_path))
        assert args.lr == pytest.approx(30 * 16 * accum / 256)
        probe.train_probe(encoder, cache, cache, 4, args, torch.device('cpu'))
        assert len(steps) == expected                                      # ragged tail dropped
        assert steps[0] == pytest.approx(args.lr)
    with pytest.raises(InputError, match='accum_iter'):
        probe.train_probe(encoder, cache, cache, 4, probe_args('--checkpoint', 'x', '--batch_size', '16',
                                                               '--accum_iter', '6'), torch.device('cpu'))


# ---------------------------------------------------------------------------------------------- RELIABILITY
# Every bad input or fault found by the drill of issue 10 ends in one clear line; distributed runs
# neither hang nor miscount; a full disk loses nothing.

def run_cli(script, argv, monkeypatch, capsys):
    """common.run in-process as `python script argv` would; -> (exit code or None, stdout, stderr)."""
    module = importlib.import_module(script[:-3])
    monkeypatch.setattr(sys, 'argv', [script, *map(str, argv)])
    code = None
    try:
        common.run(module.main, module.get_args_parser(), getattr(module, 'PRESETS', None))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err.strip()


def fails_in_one_line(script, argv, monkeypatch, capsys, *words):
    code, _, err = run_cli(script, argv, monkeypatch, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and 'Traceback' not in err, err[-2000:]
    for w in words:
        assert w in err, err
    return err


@pytest.fixture(scope='module')
def finished_runs(tmp_path_factory):
    """A 1-epoch mae_mff.py run and a 1-epoch pilamim.py run (2 steps each): {script: output dir}."""
    runs = {}
    for script in ('mae_mff.py', 'pilamim.py'):
        out = tmp_path_factory.mktemp(script[:-3])
        in_process(script, out, '--epochs', '1')
        runs[script] = out
    return runs


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize('script', ['mae_mff.py', 'pixmim_mff.py', 'pilamim.py'])
@pytest.mark.parametrize('ratio', ['0.0', '-0.5', '1.0', '1.5'])
def test_mask_ratio_leaving_no_visible_or_no_masked_patch_is_refused(tmp_path, monkeypatch, capsys, script, ratio):
    # 16 px / patch 4 = 16 patches: ratios in (0, 15/16] leave 1..15 patches visible
    fails_in_one_line(script, [*METHOD_CLI, '--output_dir', tmp_path, '--mask_ratio', ratio], monkeypatch, capsys,
                      f'--mask_ratio {float(ratio)}', 'at most 0.9375', '1 to 15')
    common.check_mask_ratio(0.9375, 16)                                  # the edge itself works
    assert int(16 * (1 - 0.9375)) == 1


@pytest.mark.parametrize('script,flags,words', [
    ('mae_mff.py', ['--lr', 'nan'], '--lr nan is not a finite'),
    ('mae_mff.py', ['--lr', '-1'], '--lr -1.0 is negative'),
    ('pixmim_mff.py', ['--blr=-1e-3'], '--blr -0.001 is negative'),
    ('pixmim_mff.py', ['--min_lr', 'inf'], '--min_lr inf is not a finite'),
    ('pilamim.py', ['--weight_decay', '-0.05'], '--weight_decay -0.05 is negative'),
    ('pilamim.py', ['--ema_momentum', '1.5'], '--ema_momentum 1.5 is outside [0, 1]'),
    ('pilamim.py', ['--ema_end', '-0.1'], '--ema_end -0.1 is outside [0, 1]'),
    ('mae_mff.py', ['--epochs', '-3'], '--epochs -3 < 1'),
    ('mae_mff.py', ['--print_freq', '0'], '--print_freq 0 < 1'),
    ('probe.py', ['--lr', 'nan'], '--lr nan is not a finite'),
    ('probe.py', ['--blr', '-1'], '--blr -1.0 is negative'),
    ('probe.py', ['--epochs', '0'], '--epochs 0 < 1'),
    ('probe.py', ['--knn', '--knn_t', '0'], '--knn_t 0.0 must be positive'),
    ('probe.py', ['--knn_k', '0'], '--knn_k 0 < 1'),
    ('probe.py', ['--batch_size', '0'], '--batch_size 0 < 1'),            # once a ZeroDivisionError
    ('probe.py', ['--preset', 'laptop', '--accum_iter', '0'], '--accum_iter 0 < 1'),
])
def test_bad_numeric_flags_are_one_line_errors(tmp_path, monkeypatch, capsys, script, flags, words):
    base = ['--checkpoint', tmp_path / 'none.pth'] if script == 'probe.py' else METHOD_CLI
    fails_in_one_line(script, [*base, '--output_dir', tmp_path / 'out', *flags], monkeypatch, capsys, words)


def test_zero_epochs_and_resuming_a_finished_run_say_so(finished_runs, tmp_path, monkeypatch, capsys):
    fails_in_one_line('pilamim.py', [*METHOD_CLI, '--output_dir', tmp_path / 'zero', '--epochs', '0'],
                      monkeypatch, capsys, '--epochs 0 < 1', 'train nothing')
    out = copy_run(finished_runs['mae_mff.py'], tmp_path / 'done')
    fails_in_one_line('mae_mff.py', [*METHOD_CLI, '--output_dir', out, '--epochs', '1', '--resume', 'auto'],
                      monkeypatch, capsys, 'finished epoch 1 of --epochs 1', 'pass --epochs larger than 1')


@pytest.mark.parametrize('script', ['mae_mff.py', 'pixmim_mff.py', 'pilamim.py', 'probe.py'])
def test_output_dir_that_cannot_be_written_is_named_before_any_work(tmp_path, monkeypatch, capsys, script):
    a_file = tmp_path / 'taken'
    a_file.write_text('not a folder')
    base = ['--checkpoint', tmp_path / 'none.pth'] if script == 'probe.py' else METHOD_CLI
    fails_in_one_line(script, [*base, '--output_dir', a_file], monkeypatch, capsys,
                      f'--output_dir {a_file}', 'is an existing file')
    fails_in_one_line(script, [*base, '--output_dir', a_file / 'run'], monkeypatch, capsys,
                      f'--output_dir {a_file / "run"}', 'is an existing file')


def disk_fills_after(limit):
    """A torch.save whose file write fails with ENOSPC after `limit` bytes, as a full disk does."""
    import io
    real_save = torch.save

    class FullDisk(io.RawIOBase):
        def __init__(self, f):
            self.f, self.n = f, 0

        def writable(self):
            return True

        def write(self, b):
            self.n += len(b)
            if self.n > limit:
                raise OSError(errno.ENOSPC, 'No space left on device')
            return self.f.write(b)

    return lambda obj, f: real_save(obj, FullDisk(f))


def test_full_disk_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch, capsys):
    path = str(tmp_path / 'checkpoint-last.pth')
    common.save_checkpoint({'w': torch.ones(1000)}, path)
    with monkeypatch.context() as m:
        m.setattr(torch, 'save', disk_fills_after(2000))                 # half-way through the new file
        with pytest.raises(common.DiskFullError, match='disk full.*previous .* is intact'):
            common.save_checkpoint({'w': torch.zeros(1000)}, path)
    assert os.listdir(tmp_path) == ['checkpoint-last.pth']               # the partial file is gone
    assert torch.equal(common.load_checkpoint(path)['w'], torch.ones(1000))
    # the same through a training run: one line, exit 2, nothing partial left behind
    monkeypatch.setattr(torch, 'save', disk_fills_after(2000))
    out = tmp_path / 'run'
    fails_in_one_line('mae_mff.py', [*METHOD_CLI, '--output_dir', out, '--epochs', '1'], monkeypatch, capsys,
                      'disk full while writing', 'free space')
    assert not [f for f in os.listdir(out) if '.tmp' in f]


def test_full_disk_on_a_log_or_result_file_is_one_line(tmp_path, monkeypatch, capsys):
    real_open = builtins.open

    def open_on_full_disk(path, mode='r', *a, **kw):
        if str(path).endswith('log.jsonl') and mode == 'a' or str(path).endswith('.json') and mode == 'w':
            raise OSError(errno.ENOSPC, 'No space left on device', str(path))
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr(builtins, 'open', open_on_full_disk)
    out = tmp_path / 'run'
    fails_in_one_line('mae_mff.py', [*METHOD_CLI, '--output_dir', out, '--epochs', '1'], monkeypatch, capsys,
                      f'disk full while writing in {out}', 'intact', '--resume auto')
    assert common.load_checkpoint(str(out / 'checkpoint-last.pth'))['epoch'] == 1   # saved before the log line
    fails_in_one_line('probe.py', ['--preset', 'laptop', '--checkpoint', out / 'checkpoint-last.pth', '--output_dir',
                                   tmp_path / 'probe', '--epochs', '1', '--builtin_size', '64', '--batch_size', '16'],
                      monkeypatch, capsys, 'disk full while writing in')


def poison_loss(monkeypatch):
    """Every loss the tracker sees becomes NaN (the model itself is untouched)."""
    add = common.LossTracker.add
    monkeypatch.setattr(common.LossTracker, 'add', lambda self, step, *v: add(self, step, *(x * math.nan for x in v)))


def test_non_finite_loss_after_resume_names_the_checkpoint(finished_runs, tmp_path, monkeypatch, capsys):
    out = copy_run(finished_runs['mae_mff.py'], tmp_path / 'run')
    poison_loss(monkeypatch)
    err = fails_in_one_line('mae_mff.py', [*METHOD_CLI, '--output_dir', out, '--resume', 'auto'], monkeypatch, capsys,
                            'non-finite loss at step 3', f'{out / "checkpoint-last.pth"} is intact')
    assert 'no checkpoint yet' not in err


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    out = tmp_path / 'run'
    out.mkdir()
    (out / f'checkpoint-last.pth.tmp{dead.pid}').write_bytes(b'partial')
    (out / 'checkpoint-4.pth.tmp1').write_bytes(b'pid 1 still runs')      # a live writer: keep
    in_process('mae_mff.py', out, '--epochs', '1')
    assert not (out / f'checkpoint-last.pth.tmp{dead.pid}').exists() and (out / 'checkpoint-4.pth.tmp1').exists()


def test_messages_point_to_the_right_flag_and_script(finished_runs, tmp_path):
    args = probe_args('--checkpoint', str(tmp_path / 'missing.pth'))
    for bad in (tmp_path / 'missing.pth', tmp_path / 'corrupt.pth'):
        (tmp_path / 'corrupt.pth').write_bytes(b'not a checkpoint')
        with pytest.raises(InputError) as e:
            probe.load_encoder(str(bad), args)
        assert '--checkpoint' in str(e.value) and '--resume' not in str(e.value)
    pila = finished_runs['pilamim.py'] / 'checkpoint-last.pth'
    with pytest.raises(InputError, match=f'written by pilamim.py, not mae_mff.py.*python pilamim.py --resume {pila}'):
        mae_mff.main(mae_mff.get_args_parser().parse_args([*METHOD_CLI, '--output_dir', str(tmp_path / 'a'),
                                                           '--resume', str(pila)]))
    old = torch.load(finished_runs['mae_mff.py'] / 'checkpoint-last.pth', weights_only=True)
    assert old.pop('script') == 'mae_mff.py'                             # recorded; without the record no
    torch.save(old, tmp_path / 'old.pth')                                # guess: the weights do not fit
    pilamim = importlib.import_module('pilamim')
    with pytest.raises(InputError, match='does not match this model'):
        pilamim.main(pilamim.get_args_parser().parse_args([*METHOD_CLI, '--output_dir', str(tmp_path / 'b'),
                                                           '--resume', str(tmp_path / 'old.pth')]))


def test_long_warmup_is_announced_and_a_dc_free_low_pass_refused(tmp_path, monkeypatch, capsys):
    import pixmim_mff
    r = pixmim_mff.smallest_radius(16)
    assert r == pytest.approx(0.5 ** 0.5) and pixmim_mff.smallest_radius(15) == 0
    x = torch.rand(1, 3, 16, 16) + 0.5
    assert ideal_low_pass(x, r).abs().max() > 0.4 and ideal_low_pass(x, 0.999 * r).abs().max() == 0
    fails_in_one_line('pixmim_mff.py', [*METHOD_CLI, '--output_dir', tmp_path, '--lpf_radius', '0.7'],
                      monkeypatch, capsys, '--lpf_radius 0.7 keeps no frequency', 'at least 0.7072 at 16 px')
    code, out, _ = run_cli('mae_mff.py', [*METHOD_CLI, '--output_dir', tmp_path / 'w', '--epochs', '1',
                                          '--warmup_epochs', '3', '--lr', '1e-3'], monkeypatch, capsys)
    assert code is None and '--warmup_epochs 3 > --epochs 1: the lr only reaches 0.000333' in out


def test_log_holds_one_run_fresh_runs_restart_it_resumed_runs_continue(finished_runs, pretrained, tmp_path):
    out = copy_run(finished_runs['mae_mff.py'], tmp_path / 'run')
    assert [r['epoch'] for r in in_process('mae_mff.py', out, '--epochs', '1')] == [1]      # fresh: anew
    assert [r['epoch'] for r in in_process('mae_mff.py', out, '--resume', 'auto')] == [1, 2]  # resumed: appended
    probe_out = str(tmp_path / 'probe')
    for pool in ('cls', 'mean'):
        probe.main(probe_args('--checkpoint', pretrained, '--pool', pool, '--builtin_size', '64', '--batch_size', '16', '--epochs', '2',
                              '--warmup_epochs', '1', '--output_dir', probe_out))
    assert [r['epoch'] for r in read_log(probe_out)] == [1, 2]
    assert sorted(os.listdir(probe_out)) == ['log.jsonl', 'probe_cls_block1.json', 'probe_mean_block1.json']


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


NAN_ON_RANK1 = '''
import math, os, sys
sys.path.insert(0, {root!r})
import common, mae_mff
if os.environ['RANK'] == '1':        # only this rank sees a NaN loss; rank 0's stays finite
    add = common.LossTracker.add
    common.LossTracker.add = lambda self, step, *v: add(self, step, *(x * math.nan for x in v))
sys.argv = ['mae_mff.py', *sys.argv[1:]]
common.run(mae_mff.main, mae_mff.get_args_parser(), mae_mff.PRESETS)
'''


def test_non_finite_loss_on_one_rank_stops_all_ranks_with_the_same_line(tmp_path):
    script = tmp_path / 'nan_rank1.py'
    script.write_text(NAN_ON_RANK1.format(root=ROOT))
    env = {**ENV, 'WORLD_SIZE': '2', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(free_port())}
    argv = [sys.executable, script, *CLI_TINY, '--epochs', '1', '--output_dir', tmp_path / 'out']
    procs = [subprocess.Popen(list(map(str, argv)), env={**env, 'RANK': str(r), 'LOCAL_RANK': str(r)}, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        errs = [p.communicate(timeout=120)[1].strip() for p in procs]    # a hang would end in a timeout here
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [2, 2], errs
    assert all(len(e.splitlines()) == 1 for e in errs) and errs[0] == errs[1], errs
    assert 'non-finite loss at step 1' in errs[0]


EXACT_EVAL = '''
import json, sys
import torch
sys.path.insert(0, {root!r})
import probe
from common import SyntheticShapes, ViTEncoder, eval_transform, init_distributed, make_loader
rank, world, device = init_distributed()
torch.manual_seed(0)
encoder = ViTEncoder(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2).eval()
train = SyntheticShapes(41, 16, transform=eval_transform(16))             # odd sizes: shards of 21/20 and 14/13
val = SyntheticShapes(27, 16, seed=1, transform=eval_transform(16))
loader = lambda ds: make_loader(ds, 8, rank, world, 0, train=False)[0]
train_x, train_y = probe.extract(encoder, loader(train), 'mean', 1, True, device, rank)
val_x, val_y = probe.extract(encoder, loader(val), 'mean', 1, True, device, rank)
bank_x, bank_y = probe.gather(train_x, world), probe.gather(train_y, world)
knn = probe.accuracy(probe.topk_hits(probe.knn_scores(bank_x, bank_y, val_x, 4, k=5), val_y, 4), world, 4)
torch.manual_seed(1)
head = torch.nn.Linear(32, 4)
args = probe.get_args_parser().parse_args(['--checkpoint', 'x', '--pool', 'mean', '--layer', '1', '--batch_size', '7',
                                           '--accum_iter', '1', '--epochs', '1', '--warmup_epochs', '0',
                                           '--output_dir', sys.argv[2]])
args.world_size = world
probe.resolve_recipe(args)
linear = [probe.evaluate(head, encoder, (val_x, val_y), 4, args, device, world),     # cached features
          probe.evaluate(head, encoder, loader(val), 4, args, device, world)]        # re-encoded
probe.train_probe(encoder, (train_x, train_y), (val_x, val_y), 4, args, device, rank, world)  # 3 vs 2 local steps
probe.LAMBDAS = [1e-1, 1e-2]                                             # small lambdas: slow on 33 images
lbfgs = probe.logreg_probe((train_x, train_y), (val_x, val_y), 4, world)     # gathered, solved on every rank
if rank == 0:
    json.dump({{'knn': knn, 'linear': linear, 'bank_y': bank_y.tolist(), 'bank_x': bank_x.sum().item(),
               'lbfgs': [lbfgs[k] for k in ('top1', 'top1_halves', 'lambda', 'heldout_top1')]}}, open(sys.argv[1], 'w'))
import common
common.close_distributed()                      # else gloo may abort the exit ("terminate called ...")
'''


def test_evaluation_under_torchrun_counts_every_image_once(tmp_path):
    script = tmp_path / 'exact_eval.py'
    script.write_text(EXACT_EVAL.format(root=ROOT))
    subprocess.run([sys.executable, script, tmp_path / 'one.json', tmp_path], check=True, timeout=120, env=ENV,
                   capture_output=True)
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', script,
                    tmp_path / 'two.json', tmp_path], check=True, timeout=180, env=ENV)
    one, two = json.load(open(tmp_path / 'one.json')), json.load(open(tmp_path / 'two.json'))
    assert one['bank_y'] == two['bank_y'] == [SyntheticShapes(41, 16)[i][1] for i in range(41)]  # dataset order
    assert two['bank_x'] == pytest.approx(one['bank_x'], rel=1e-5)
    assert one['knn'] == two['knn'] and one['linear'] == two['linear'] and one['lbfgs'] == two['lbfgs']
    assert one['linear'][0] == one['linear'][1] and round(one['knn'][0] * 27 / 100, 6) % 1 == 0   # hits of 27
    top1, halves = one['linear'][0][0], one['linear'][0][2]              # halves of 13 and 14 images, in order
    assert halves[0] * 13 + halves[1] * 14 == pytest.approx(top1 * 27)


def children(pid):
    """-> {rank: pid} of a torchrun agent's worker processes."""
    workers = {}
    for entry in os.listdir('/proc'):
        try:
            with open(f'/proc/{entry}/stat') as f:
                ppid = int(f.read().rsplit(')', 1)[1].split()[1])
            if ppid == pid:
                env = dict(kv.split('=', 1) for kv in open(f'/proc/{entry}/environ').read().split('\0') if '=' in kv)
                workers[int(env['RANK'])] = int(entry)
        except (OSError, ValueError, KeyError, IndexError):
            continue
    return workers


def test_a_killed_rank_brings_the_torchrun_job_down(tmp_path):
    out = tmp_path / 'out'
    job = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                            os.path.join(ROOT, 'mae_mff.py'), *CLI_TINY, '--epochs', '1000', '--output_dir', str(out)],
                           cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ((out / 'log.jsonl').exists() and (out / 'log.jsonl').read_text()) and time.time() < deadline:
            time.sleep(0.1)
        workers = children(job.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGKILL)
        killed = time.time()
        _, err = job.communicate(timeout=90)                             # bounded: no hang in a collective
        assert job.returncode != 0 and time.time() - killed < 90
        assert 'ChildFailedError' in err or 'Signal 9' in err, err[-2000:]
        assert torch.load(out / 'checkpoint-last.pth', weights_only=True)['epoch'] >= 1   # --resume auto continues
    finally:
        job.kill()
        for pid in children(job.pid).values():
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- finetune.py


import finetune  # noqa: E402

FT_ARCH = dict(img_size=16, patch_size=4, embed_dim=32, depth=12, num_heads=2, mlp_ratio=4.)
# Tiny recipe on built-in data: 16 images per step, RandAugment + erasing + Mixup/CutMix on (the RNGs resume must restore).
FT_CLI = ['--builtin_size', '64', '--batch_size', '16', '--epochs', '2', '--warmup_epochs', '1', '--blr', '1e-3',
          '--num_workers', '0', '--save_freq', '1', '--print_freq', '2', '--aa', 'rand-m9-mstd0.5-inc1',
          '--reprob', '0.25', '--mixup', '0.8', '--cutmix', '1.0', '--crop_min', '0.08']


def finetune_run(*flags):
    """finetune.py in-process with its laptop preset (built-in data) under the given flags."""
    return finetune.main(common.parse_args(finetune.get_args_parser(), finetune.PRESETS,
                                           ['--preset', 'laptop', *map(str, flags)]))


def test_finetune_layer_decay_groups_follow_the_mae_rule():
    model = finetune.vit_classifier(FT_ARCH, 10)
    args = argparse.Namespace(weight_decay=0.05, layer_decay=0.65, lr=1.0)
    optimizer = finetune.layer_decay_optimizer(model, args, torch.device('cpu'))
    common.set_lr(optimizer, 2.0)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in optimizer.param_groups:
        for p in group['params']:
            name = names[id(p)]
            seen.add(name)
            layer = 0 if name.startswith(('patch_embed.', 'cls_token', 'pos_embed')) else \
                int(name.split('.')[1]) + 1 if name.startswith('blocks.') else 13
            assert name.startswith(('fc_norm.', 'head.')) or layer < 13, name
            assert group['lr_scale'] == pytest.approx(0.65 ** (13 - layer)), name
            assert group['lr'] == pytest.approx(2.0 * 0.65 ** (13 - layer)), name
            no_decay = p.ndim <= 1 or name in ('pos_embed', 'cls_token')
            assert group['weight_decay'] == (0. if no_decay else 0.05), name
    assert seen == {n for n, _ in model.named_parameters()} and 'norm.weight' not in seen  # encoder norm dropped


def test_finetune_loads_the_encoder_and_resizes_the_position_embedding():
    torch.manual_seed(0)
    mae = MaskedAutoencoder(**TINY, mff_layers=[0, 3])
    with torch.no_grad():
        mae.pos_embed[:, 0] = torch.randn(32)                             # a cls row to keep
    state = common.encoder_state_dict(mae.state_dict())
    arch = dict(FT_ARCH, depth=4)
    same = finetune.vit_classifier(arch, 5)
    finetune.load_pretrained(same, state, 'mae')
    assert torch.equal(same.pos_embed, mae.pos_embed) and same.pos_embed.requires_grad   # exact at the same size
    assert torch.equal(same.blocks[3].mlp.fc2.weight, mae.blocks[3].mlp.fc2.weight)
    assert same.head.weight.std() < 1e-4 and torch.equal(same.fc_norm.weight, torch.ones(32))
    bigger = finetune.vit_classifier(dict(arch, img_size=24), 5)          # grid 4x4 -> 6x6
    flat = dict(state, pos_embed=torch.cat([mae.pos_embed[:, :1], torch.full((1, 16, 32), 0.3)], 1))
    finetune.load_pretrained(bigger, flat, 'mae')
    assert bigger.pos_embed.shape == (1, 37, 32) and torch.equal(bigger.pos_embed[:, 0], mae.pos_embed[:, 0])
    assert torch.allclose(bigger.pos_embed[:, 1:], torch.full((1, 36, 32), 0.3), atol=1e-5)  # constant stays so
    with pytest.raises(InputError, match='does not fit a ViT classifier'):
        finetune.load_pretrained(finetune.vit_classifier(arch, 5, cls_token=True),
                                 {k: v for k, v in state.items() if not k.startswith('norm.')}, 'mae', cls_token=True)


def test_low_shot_subset_is_stratified_deterministic_and_rank_independent():
    targets = [0] * 100 + [1] * 50 + [2] * 10 + [0] * 30
    picks = []
    for global_seed in (1, 2):                                           # ranks differ in their global RNG state
        torch.manual_seed(global_seed)
        picks.append(finetune.low_shot_indices(targets, 0.1, seed=5))
    assert picks[0] == picks[1] and picks[0] == sorted(set(picks[0]))
    assert [sum(targets[i] == c for i in picks[0]) for c in range(3)] == [13, 5, 1]
    assert finetune.low_shot_indices(targets, 0.1, seed=6) != picks[0]
    assert finetune.low_shot_indices(targets, 1.0, seed=5) == list(range(len(targets)))


def save_shapes(root, classes, n=3, size=16):
    """An ImageNet-style folder of built-in images: root/<class>/<i>.png for the given shape classes."""
    shapes = SyntheticShapes(64, size, seed=3)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        picked = [i for i in range(64) if shapes.SHAPES[shapes.draw(i)[1]] == c][:n]
        for i in picked:
            Image.fromarray(shapes.draw(i)[0]).save(root / c / f'{c}_{i}.png')


def test_eval_path_scores_only_its_own_classes(tmp_path):
    save_shapes(tmp_path / 'r', ['circle', 'ring'], n=2)
    args = argparse.Namespace(eval_path=[str(tmp_path / 'r')], input_size=16)
    (path, ds, ids), = finetune.eval_sets(args, list(SyntheticShapes.SHAPES))
    assert ids == [0, 3] and ds.classes == ['circle', 'ring']

    class Fixed(nn.Module):                                              # always: square first, then ring
        def forward(self, x):
            return torch.tensor([0., 10., 0., 5.]).expand(len(x), 4)
    loader = make_loader(ds, 3, 0, 1, 0, train=False)[0]
    assert finetune.evaluate(Fixed(), loader, torch.device('cpu'), 1, 4, ids) == (50.0, None)  # ring = 2 of 4
    save_shapes(tmp_path / 'bad', ['circle'], n=1)
    (tmp_path / 'bad' / 'dog').mkdir()
    Image.new('RGB', (16, 16)).save(tmp_path / 'bad' / 'dog' / 'd.png')
    with pytest.raises(InputError, match="not training classes.*'dog'"):
        finetune.eval_sets(argparse.Namespace(eval_path=[str(tmp_path / 'bad')], input_size=16),
                           list(SyntheticShapes.SHAPES))


def test_short_finetune_improves_and_its_weights_load_into_timm(pretrained, tmp_path):
    out = tmp_path / 'ft'
    result = finetune_run('--checkpoint', pretrained, '--output_dir', out, *FT_CLI, '--builtin_size', '256',
                          '--batch_size', '32', '--epochs', '4', '--blr', '4e-3', '--mixup', '0', '--cutmix', '0',
                          '--aa', '', '--reprob', '0')
    log = read_log(out)
    assert [r['epoch'] for r in log] == [1, 2, 3, 4], log
    assert log[-1]['loss'] < log[0]['loss'] - 0.05 and log[-1]['top1'] > log[0]['top1'] + 2, log  # 256 val images
    assert result['top1'] == log[-1]['top1'] and result['best_top1'] == max(r['top1'] for r in log)
    from timm.models.vision_transformer import VisionTransformer
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=2, num_heads=3, global_pool='avg',
                            num_classes=4).eval()
    ckpt = torch.load(out / 'checkpoint-last.pth', weights_only=True)
    vit.load_state_dict(ckpt['model'], strict=True)
    ours = finetune.vit_classifier(dict(FT_ARCH, img_size=32, embed_dim=192, depth=2, num_heads=3), 4).eval()
    ours.load_state_dict(ckpt['model'])
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit(imgs), ours(imgs), atol=1e-6)
    evaluated = finetune_run('--eval', '--checkpoint', out / 'checkpoint-last.pth', '--output_dir', out, *FT_CLI,
                             '--builtin_size', '256')                    # --eval alone: the same val top-1
    assert evaluated['top1'] == result['top1'] and json.load(open(out / 'eval.json'))['top1'] == result['top1']
    # probe.py reads the fine-tuned encoder: its `mean` feature is the classifier's own pre-logits feature
    encoder = common.load_encoder(str(out / 'checkpoint-last.pth'), probe_args('--checkpoint', 'x'))[0]
    with torch.no_grad():
        tokens = encoder.forward_blocks(encoder.embed(imgs), [encoder.depth - 1])[-1]
        assert torch.allclose(encoder.norm(tokens[:, 1:].mean(1)),
                              vit.forward_head(vit.forward_features(imgs), pre_logits=True), atol=1e-5)


def test_finetune_resume_after_an_epoch_and_sparse_evaluation_equal_the_uninterrupted_run(pretrained, tmp_path):
    full = finetune_run('--checkpoint', pretrained, '--output_dir', tmp_path / 'full', *FT_CLI)
    sparse = finetune_run('--checkpoint', pretrained, '--output_dir', tmp_path / 'sparse', *FT_CLI, '--eval_freq', 2)
    assert ['top1' in r for r in read_log(tmp_path / 'sparse')] == [False, True]   # only after the last epoch
    assert sparse['top1'] == full['top1']                                # evaluating leaves training as it was
    resumed_dir = tmp_path / 'resumed'
    resumed_dir.mkdir()
    shutil.copy(tmp_path / 'full' / 'checkpoint-1.pth', resumed_dir / 'checkpoint-last.pth')  # "killed" after 1
    resumed = finetune_run('--checkpoint', pretrained, '--output_dir', resumed_dir, '--resume', 'auto', *FT_CLI)
    assert [r['epoch'] for r in read_log(resumed_dir)] == [2]
    a = torch.load(tmp_path / 'full' / 'checkpoint-2.pth', weights_only=True)
    b = torch.load(resumed_dir / 'checkpoint-2.pth', weights_only=True)
    assert a['step'] == b['step'] == 8 and a['best_top1'] == b['best_top1']
    for k in a['model']:                                                 # RandAugment, erasing, Mixup, drop path
        assert torch.equal(a['model'][k], b['model'][k]), k
    assert full['top1'] == resumed['top1'] and read_log(tmp_path / 'full')[-1] == read_log(resumed_dir)[-1]
    with pytest.raises(InputError, match='finished epoch 2 of --epochs 2'):   # nothing left: said, not skipped
        finetune_run('--checkpoint', pretrained, '--output_dir', resumed_dir, '--resume', 'auto', *FT_CLI)


FT_DDP_EVAL = '''
import sys, torch
sys.path.insert(0, {root!r})
from common import init_distributed, make_loader
from finetune import evaluate
rank, world, device = init_distributed()
labels = torch.tensor([0] * 10 + [1] * 27)                               # 37 images: two shards of 19 and 18
data = torch.utils.data.TensorDataset(torch.zeros(37, 3, 4, 4), labels)

class AlwaysZero(torch.nn.Module):
    def forward(self, x):
        return torch.tensor([1., 0.]).expand(len(x), 2)
loader = make_loader(data, 4, rank, world, 0, train=False)[0]
top1, _ = evaluate(AlwaysZero(), loader, device, world, 2)
if rank == 0:
    open(sys.argv[1], 'w').write(repr(top1))
import common
common.close_distributed()                      # else gloo may abort the exit ("terminate called ...")
'''


def test_finetune_two_process_evaluation_counts_every_image_once(tmp_path):
    script = tmp_path / 'ddp_eval.py'
    script.write_text(FT_DDP_EVAL.format(root=ROOT))
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', script,
                    tmp_path / 'top1.txt'], check=True, timeout=120, capture_output=True, env=ENV)
    assert float((tmp_path / 'top1.txt').read_text()) == pytest.approx(100 * 10 / 37)  # padding would give 11/38


@pytest.fixture(scope='module')
def shape_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes')
    for split in ('train', 'val'):
        save_shapes(root / split, ['circle', 'ring'], n=2)
    return root


@pytest.mark.parametrize('flags, message', [
    (['--data_path', '{folders}/train'], 'no val/ folder'),
    (['--data_path', '{folders}', '--eval_path', '{folders}/bad'], 'not training classes'),
    (['--checkpoint', '{tmp}/no_vit.pth'], r"in no format this project reads \(first keys \['head.weight'\]"),
    (['--train_fraction', '1.5'], r'outside \(0, 1\]'),
    (['--train_fraction', '0'], r'outside \(0, 1\]'),
    (['--data_path', '{folders}', '--subset_file', '{tmp}/1percent.txt'], 'names 1 images that are not in'),
    (['--batch_size', '7'], '--batch_size 7 is odd'),
    (['--batch_size', '1'], '--batch_size 1 is odd'),
    (['--eval'], 'needs a fine-tuned checkpoint'),
    (['--eval_freq', '0'], '--eval_freq 0 < 1'),
])
def test_finetune_bad_input_is_one_line(pretrained, shape_folders, tmp_path, monkeypatch, capsys, flags, message):
    save_checkpoint({'model': {'head.weight': torch.zeros(2, 2)}}, str(tmp_path / 'no_vit.pth'))
    present = sorted(os.listdir(shape_folders / 'train' / 'circle'))[0]
    (tmp_path / '1percent.txt').write_text(f'{present}\nn01440764_10026.JPEG\n')
    save_shapes(shape_folders / 'bad', ['square'], n=1)                 # square is no training class there
    flags = [f.format(tmp=tmp_path, folders=shape_folders) for f in flags]
    if '--checkpoint' not in flags:
        flags = ['--checkpoint', pretrained, *flags]
    monkeypatch.setattr(sys, 'argv', ['finetune.py', '--preset', 'laptop', *FT_CLI, '--output_dir', str(tmp_path / 'out'),
                                      *flags])
    with pytest.raises(SystemExit) as e:
        common.run(finetune.main, finetune.get_args_parser(), finetune.PRESETS)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err


def test_finetune_without_checkpoint_is_the_supervised_baseline(tmp_path, capsys):
    result = finetune_run('--model', 'vit_tiny_patch8', '--input_size', '16', '--output_dir', tmp_path, *FT_CLI,
                          '--epochs', '1')
    assert 'from scratch (supervised baseline' in capsys.readouterr().out and result['checkpoint'] is None
    ckpt = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    assert ckpt['model']['pos_embed'].shape == (1, 5, 192) and ckpt['classes'] == list(SyntheticShapes.SHAPES)


# ---------------------------------------------------------------------------------------------- REPRODUCE
# reproduce.py at its miniature scale (--scale test). Parts whose scripts are not in this checkout
# (finetune.py, analyze.py) are left out of the run, and only here.

import reproduce  # noqa: E402


def image_folder(root, per_class, size=20):
    """An ImageNet-style folder of built-in shapes as JPEG files: train/ and val/, one folder per shape."""
    for split, n in per_class.items():
        data = SyntheticShapes(4 * n * 3, size, seed=split == 'val')
        done = {c: 0 for c in data.SHAPES}
        for i in range(len(data)):
            img, label = data[i]
            c = data.SHAPES[label]
            if done[c] < n:
                os.makedirs(root / split / c, exist_ok=True)
                img.save(root / split / c / f'{i}.jpg', quality=95)
                done[c] += 1
    return root


def test_reproduce_on_an_image_folder_end_to_end_then_a_rerun_skips_every_finished_step(tmp_path):
    # A folder of a few dozen images per class: every step gets batches that fit it (the probe's
    # ImageNet recipe would need 16384 images, the low-shot subsets hold 4 images here).
    data = image_folder(tmp_path / 'shapes', {'train': 12, 'val': 4})
    analyses = ['entropy', 'frequency', 'hessian', 'fusion', 'reconstruct']
    parts = ['pretrain', 'probe', 'knn', 'noise', 'finetune', 'lowshot'] + analyses
    flags = ['--scale', 'test', '--data_path', data, '--only', ','.join(parts + ['mae', 'mff_mae']),
             '--output_dir', tmp_path / 'out']
    first = cli('reproduce.py', *flags)
    root = tmp_path / 'out' / 'test_shapes'
    res = json.loads((root / 'results.json').read_text())
    runs = res['runs']
    assert set(runs) == {'mae', 'mff_mae'}                               # --only kept the other methods out
    for m in runs:
        for metric in ['cls_data', 'mean_data', 'clsraw_data', 'abmilp_data', 'knn_data',
                       'finetune', 'lowshot_10%', 'lowshot_1%']:
            assert 0 <= runs[m][metric]['0'] <= 100, (m, metric)
        assert math.isfinite(runs[m]['pretrain_loss']['0']) and 'hf_last' in runs[m] and 'hessian_max' in runs[m]
        assert set(runs[m]['probe_seed:clsraw_data']) == {'0', '1'}       # the probe-noise runs
        assert runs[m]['sa_gain_data']['0'] == pytest.approx(runs[m]['abmilp_data']['0'] - runs[m]['clsraw_data']['0'])
    assert 'fusion_w0_gain' in runs['mff_mae'] and 'fusion_w0_gain' not in runs['mae']  # only MFF has weights
    claim = next(r for r in res['claims'] if r['claim'].startswith('MFF-MAE > MAE, linear probe')
                 and r['methods'] == ['mff_mae', 'mae'])
    assert claim['value'] == pytest.approx(runs['mff_mae']['cls_data']['0'] - runs['mae']['cls_data']['0'])
    assert claim['verdict'].startswith('one seed, no SE')                # no verdict from one seed
    md = (root / 'results.md').read_text()
    assert '| claim | published | measured | ± SE | 2 SE | seeds | verdict |' in md and '| MFF-MAE |' in md
    assert '## Where the spread comes from' in md
    lowshot = (root / 'lowshot' / 'mae_s0_1' / 'run.log').read_text()
    assert 'effective batch 4 (' in lowshot or 'batch 4' in lowshot      # 1 image per class, 4 classes
    assert set(json.loads((root / 'analysis' / 'frequency_s0' / 'frequency.json').read_text())) == {'mae', 'mff_mae'}
    ckpt = root / 'pretrain' / 'mae_s0' / 'checkpoint-1.pth'
    assert ckpt.exists() and not (ckpt.parent / 'checkpoint-last.pth').exists()
    n = sum(1 for line in first.stdout.splitlines() if line.startswith('['))  # one line per step run
    assert n == len([v for v in res['steps'].values() if v['done']]) > 20    # results.json lists the whole study
    assert f'{n} steps: 0 done already (skipped), {n} to run' in first.stdout

    before = {p: p.stat().st_mtime_ns for p in root.rglob('*.json') if p.name != 'results.json'}
    second = cli('reproduce.py', *flags)
    assert f'{n} steps: {n} done already (skipped), 0 to run' in second.stdout and '[1/' not in second.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before and ckpt.stat().st_mtime_ns
    assert json.loads((root / 'results.json').read_text())['runs'] == runs
    cli('reproduce.py', *flags[:5], 'probe,mae', *flags[6:])            # a narrower rerun keeps every result
    assert json.loads((root / 'results.json').read_text())['runs'] == runs


def test_reproduce_an_analysis_is_finished_only_when_it_holds_every_run_it_compares(tmp_path):
    done = tmp_path / 'frequency.json'
    step = reproduce.Step('frequency', 'frequency seed 0', [], str(tmp_path), str(done), [], 0.,
                          [('mae', 0), ('pilamim', 0)], ('mae', 'pilamim'))
    assert not reproduce.finished(step)
    done.write_text(json.dumps({'mae': {}}))                             # a study that has since added PiLaMIM
    assert not reproduce.finished(step)
    done.write_text(json.dumps({'mae': {}, 'mae_control': {}, 'pilamim': {}}))
    assert reproduce.finished(step)
    probe = step._replace(part='probe', key=(('probe_cls_block1.json', 'cls_shape'),))
    assert reproduce.finished(probe) and not reproduce.finished(probe._replace(done=str(tmp_path / 'none.json')))


def test_reproduce_claims_arithmetic():
    cfg = {'tasks': ('shape', 'count')}
    runs = {'mae': {'cls_shape': {0: 50., 1: 52., 2: 54.}, 'cls_count': {0: 60., 1: 60., 2: 60.}},
            'mae_control': {'cls_shape': {0: 58., 1: 61., 2: 64.}},
            'mff_mae': {'cls_shape': {0: 60., 1: 61., 2: 62.}},
            'pilamim': {'cls_shape': {0: 51., 1: 53., 2: 55.}, 'cls_count': {0: 50., 1: 51., 2: 52.}}}
    rows = {r['claim']: r for r in reproduce.claims(runs, cfg)}
    published = rows[f'MFF-MAE > MAE, linear probe [cls], semantic task ({reproduce.AS_PUBLISHED})']
    assert published['value'] == pytest.approx(9.) and published['se'] == pytest.approx(math.sqrt(4 / 3 + 1 / 3))
    assert published['verdict'] == 'holds' and published['seeds'] == 3  # Welch SE over seeds
    alone = rows[f'MFF-MAE > MAE, linear probe [cls], semantic task ({reproduce.FUSION_ALONE})']
    assert alone['methods'] == ['mff_mae', 'mae_control'] and alone['value'] == pytest.approx(0.)
    assert alone['verdict'] == 'within noise: the study is too small to see the published gap'  # 2 SE 3.7 > 1.8
    assert rows['PiLaMIM > MAE on the semantic task ([cls] probe)']['verdict'] == \
        'within noise, though the published gap would have shown'       # +1 +- 1.6: 2 SE 3.3 < 8.1
    assert rows['PiLaMIM keeps the low-level task ([cls] probe, count)']['verdict'] == 'does not hold'  # -9 +- 0.6
    assert rows[f'PixMIM > MAE, linear probe [cls] ({reproduce.AS_PUBLISHED})']['verdict'] == 'not measured'
    assert reproduce.verdict(-3., 1., 3, '>0') == 'does not hold'
    assert reproduce.verdict(-1., 1., 3, 'not<0') == 'holds (no significant loss)'
    assert reproduce.verdict(0.95, 0.01, 3, '>0.9') == 'holds'
    assert reproduce.verdict(-2., 0.5, 3, '<0') == 'holds'
    assert reproduce.verdict(5., None, 1, '>0') == 'one seed, no SE: the sign agrees with the claim'
    assert reproduce.verdict(5., None, 1, '<0') == 'one seed, no SE: the sign is against the claim'


def test_reproduce_noise_decomposition():
    # over seeds sd 2 (both methods), evaluation sd 1 (halves 2 apart), probe sd 1 on seed 0 -> pre-training sqrt(2)
    cfg = {'tasks': ('shape',), 'seeds': 3}
    halves = {0: 1., 1: 1., 2: 1.}                                       # (h1 - h2)^2 / 4 with h1 - h2 = 2
    runs = {m: {'clsraw_shape': {0: 50., 1: 52., 2: 54.}, 'evalvar:clsraw_shape': halves,
                'probe_seed:clsraw_shape': {0: 50., 1: 51., 2: 49.}, 'cls_shape': {0: 60., 1: 62., 2: 64.},
                'evalvar:cls_shape': halves} for m in ('mae', 'mff_mae')}
    rows = {r['metric']: r for r in reproduce.noise(runs, cfg)}
    raw = rows['clsraw_shape']
    assert (raw['total'], raw['evaluation'], raw['probe']) == pytest.approx((2., 1., 1.))
    assert raw['pretraining'] == pytest.approx(math.sqrt(2.)) and raw['se_difference'] == pytest.approx(2 * math.sqrt(2 / 3))
    assert rows['cls_shape']['probe'] == 0. and rows['cls_shape']['pretraining'] == pytest.approx(math.sqrt(3.))
    assert rows['finetune']['total'] is None                             # not measured: no numbers invented


def test_reproduce_dry_run_every_command_parses_and_bad_selection(tmp_path):
    default = cli('reproduce.py', '--dry_run', '--output_dir', tmp_path).stdout  # printed only
    assert 'python mae_mff.py --model mae_vit_tiny_patch4 --depth 6' in default and 'pretrain pilamim seed 2' in default
    assert 'python probe.py' in default and not (tmp_path / 'laptop').exists()
    assert not re.search('pixmim|finetune.py|--knn', default)        # what 3 seeds cannot decide: --all or --only
    proc = cli('reproduce.py', '--dry_run', '--all', '--output_dir', tmp_path)
    assert re.search(r'pretrain mff_pixmim seed 2: ', proc.stdout) and '--knn' in proc.stdout
    assert re.search(r'lowshot 1% mae seed 0: python finetune.py .*--epochs 30 .*--eval_freq 30 ', proc.stdout)
    named = cli('reproduce.py', '--dry_run', '--only', 'pretrain,pixmim', '--output_dir', tmp_path).stdout
    assert named.count('pretrain pixmim seed') == 3 and 'pretrain mae ' not in named
    commands = [line.split(': python ', 1)[1] for line in proc.stdout.splitlines() if ': python ' in line]
    assert len(commands) > 120
    parsers = {}
    for command in commands:                                             # every flag exists in its script
        script, *argv = shlex.split(command)
        if script not in parsers:
            parsers[script] = importlib.import_module(script[:-3]).get_args_parser()
        args = parsers[script].parse_args(argv)
        if script == 'probe.py':                                         # paired: the same images for every run
            assert args.builtin_seed == reproduce.EVAL_SEED
            assert args.knn or (args.batch_size, args.accum_iter, args.blr) == (256, 1, 30.)  # the laptop recipe
    assert re.search(r'pretrain mae_control seed 0: .*--mff_layers none --crop simple --wd_rule mmpretrain', proc.stdout)
    assert re.search(r'pretrain pilamim seed 0: .*--lr_schedule iter', proc.stdout)   # one schedule rule
    assert re.search(r'--pool cls,mean --solver lbfgs .*--builtin_val_size 4096', proc.stdout)
    assert re.search(r'--pool cls,abmilp --feature_norm off', proc.stdout)          # raw vs raw
    proc = cli('reproduce.py', '--only', 'probe,bogus', '--output_dir', tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "['bogus']" in lines[0] and 'pretrain' in lines[0]
    proc = cli('reproduce.py', '--data_path', tmp_path, '--dry_run', '--output_dir', tmp_path, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and 'no train/ folder' in lines[0]


# ---------------------------------------------------------------------------------------------- ANALYSIS (analyze.py)

import analyze  # noqa: E402  (this section's own import, kept here for an easy merge)
from common import (attention_entropy, entropy_over_patch_keys, explicit_attention, hessian_top_eigenvalues,  # noqa: E402
                    hessian_vector_product, relative_log_amplitude)


def grid_tokens(maps):
    """(N, C, h, h) maps -> (N, h*h, C) patch tokens, row-major as the ViT lays them out."""
    return maps.flatten(2).transpose(1, 2)


def test_relative_log_amplitude_of_impulse_constant_and_grating():
    h = 8
    impulse = torch.zeros(2, 3, h, h)
    impulse[:, :, 3, 5] = 1.                                             # flat spectrum
    assert torch.allclose(relative_log_amplitude(grid_tokens(impulse)), torch.zeros(h // 2), atol=1e-5)
    flat = relative_log_amplitude(grid_tokens(torch.full((2, 3, h, h), 2.)))  # DC only
    assert flat[0] == 0 and (flat[1:] < -15).all()
    r, c = torch.meshgrid(torch.arange(h), torch.arange(h), indexing='ij')
    for k in (1, 2, 3):                                                  # diagonal grating, k cycles per h
        grating = torch.cos(2 * math.pi * k * (r + c) / h).expand(1, 4, h, h)
        assert int(relative_log_amplitude(grid_tokens(grating)).argmax()) == k


def test_smoothing_lowers_high_frequencies():
    torch.manual_seed(0)
    noise = torch.randn(4, 16, 14, 14)
    smooth = torch.nn.functional.avg_pool2d(noise, 3, stride=1, padding=1, count_include_pad=False)
    white, low = relative_log_amplitude(grid_tokens(noise)), relative_log_amplitude(grid_tokens(smooth))
    assert white.shape == (7,) and white[-1].abs() < 0.3                 # white noise: flat
    assert low[-1] < white[-1] - 1 and (low[1:] < white[1:]).all()


def test_explicit_attention_reproduces_the_block():
    torch.manual_seed(0)
    for blk in (ViTEncoder(**PROBE_TINY).blocks[0], common.Block(64, 4, qkv_bias=True, qk_norm=True)):
        blk.eval()
        if hasattr(blk.attn.q_norm, 'weight'):                           # make q_norm / k_norm matter
            nn.init.normal_(blk.attn.q_norm.weight)
            nn.init.normal_(blk.attn.k_norm.bias)
        x = blk.norm1(torch.randn(3, 17, 64))
        probs, out = explicit_attention(blk.attn, x)
        assert probs.shape == (3, blk.attn.num_heads, 17, 17)
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-6)
        assert torch.allclose(out, blk.attn(x), atol=1e-5)


def test_entropy_is_ln_L_for_uniform_and_0_for_one_hot():
    L = 16
    uniform = torch.full((2, 3, L + 1, L + 1), 1 / (L + 1))
    assert torch.allclose(entropy_over_patch_keys(uniform), torch.full((2, 3, L + 1), math.log(L)), atol=1e-4)
    one_hot = torch.zeros(2, 3, L + 1, L + 1)
    one_hot[..., 5] = 1.
    assert entropy_over_patch_keys(one_hot).abs().max() < 1e-4
    encoder = ViTEncoder(**PROBE_TINY).eval()                            # q = k = 0: uniform attention
    for blk in encoder.blocks:
        nn.init.zeros_(blk.attn.qkv.weight[:128])
        nn.init.zeros_(blk.attn.qkv.bias[:128])
    cls, patch = attention_entropy(encoder, torch.randn(2, 3, 32, 32))
    assert cls.shape == patch.shape == (2,)
    assert torch.allclose(torch.cat([cls, patch]), torch.full((4,), math.log(64)), atol=1e-4)


def test_hessian_top3_of_a_known_quadratic():
    torch.manual_seed(0)
    eig = torch.tensor([10., -4., 1.5, 0.3, 0.2, 0.1, 0.05, 0.01])      # largest magnitude first
    q = torch.linalg.qr(torch.randn(8, 8))[0]
    A = q @ torch.diag(eig) @ q.T
    a, b = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(3))   # two parameter tensors
    found = hessian_top_eigenvalues(lambda: 0.5 * torch.cat([a, b]) @ A @ torch.cat([a, b]), [a, b], k=3)
    assert found == pytest.approx(eig[:3].tolist(), rel=1e-3)


def test_hessian_vector_product_matches_finite_differences_on_a_tiny_vit():
    torch.manual_seed(0)
    model = MaskedAutoencoder(**TINY, mff_layers=(1, 3), norm_pix_loss=True).double().eval()
    imgs, noise = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.rand(2, 16)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = lambda: model(imgs, 0.75, noise=noise)[0]                  # noqa: E731
    v = [torch.randn_like(p) for p in params]
    v = [d / torch.cat([e.flatten() for e in v]).norm() for d in v]     # a unit direction
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        hv = hessian_vector_product(torch.autograd.grad(loss_fn(), params, create_graph=True), params, v)
    eps, grads = 1e-2, []                                            # masked_mse is fp32: no tiny steps
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(params, v):
                p.add_(sign * eps * d)
        grads.append(torch.autograd.grad(loss_fn(), params))
        with torch.no_grad():
            for p, d in zip(params, v):
                p.sub_(sign * eps * d)
    fd = torch.cat([(g1 - g2).flatten() / (2 * eps) for g1, g2 in zip(*grads)])
    hv = torch.cat([h.flatten() for h in hv])
    assert (hv - fd).norm() < 1e-4 * fd.norm()
    top = hessian_top_eigenvalues(loss_fn, model.parameters(), k=1)[0]   # bounds every Rayleigh quotient
    vv = torch.cat([d.flatten() for d in v])
    assert abs(top) >= abs(float(hv @ vv))


@pytest.fixture(scope='module')
def analysis_run(tmp_path_factory):
    """A 2-epoch MFF run (2 steps per epoch, weights logged every step) and untrained PixMIM / PiLaMIM checkpoints."""
    root = tmp_path_factory.mktemp('analysis')
    in_process('mae_mff.py', root / 'mff', '--mff_layers', '0,5,11')
    for script in ('pixmim_mff.py', 'pilamim.py'):
        module = importlib.import_module(script[:-3])
        args = module.get_args_parser().parse_args(METHOD_CLI)
        module.resolve_recipe(args)
        torch.manual_seed(0)
        save_checkpoint({'model': module.build_model(args).state_dict(), 'args': vars(args), 'script': script},
                        str(root / f'{script[:-3]}.pth'))
    return root


def analyze_cli(command, out, *flags):
    analyze.main(analyze.get_args_parser().parse_args([command, '--output_dir', str(out), *map(str, flags)]))
    name = {'entropy': 'attention_entropy'}.get(command, command)
    return json.load(open(os.path.join(out, f'{name}.json')))


def test_fusion_weights_are_logged_at_the_print_points_and_drawn(analysis_run, tmp_path):
    run_dir = analysis_run / 'mff'
    lines = [json.loads(line) for line in open(run_dir / 'fusion_weights.jsonl')]
    assert [r['epoch'] for r in lines] == [0.5, 1.0, 1.5, 2.0] and [r['step'] for r in lines] == [1, 2, 3, 4]
    assert lines[-1]['levels'] == [0, 5, 11] and lines[-1]['fusion_weights'] == read_log(run_dir)[-1]['fusion_weights']
    with open(run_dir / 'fusion_weights.jsonl', 'a') as f:               # a resumed run repeats steps 3-4
        f.write(json.dumps({**lines[2], 'fusion_weights': [0.2, 0.3, 0.5]}) + '\n')
    result = analyze_cli('fusion', tmp_path, '--log', run_dir / 'log.jsonl', '--labels', 'mff')['mff']
    assert result['step'] == [1, 2, 3] and result['fusion_weights'][-1] == [0.2, 0.3, 0.5]
    assert result['levels'] == [0, 5, 11] and (tmp_path / 'fusion.png').exists()


def test_frequency_entropy_hessian_reconstruct_run_end_to_end(analysis_run, tmp_path):
    ckpt = analysis_run / 'mff' / 'checkpoint-last.pth'
    freq = analyze_cli('frequency', tmp_path, '--checkpoint', ckpt, analysis_run / 'pilamim.pth', '--num_images', 6,
                       '--batch_size', 4, '--labels', 'mff', 'pilamim')
    amps = freq['mff']['relative_log_amplitude']
    assert len(amps) == 13 and all(len(a) == 2 and a[0] == 0 for a in amps)
    assert amps != freq['pilamim']['relative_log_amplitude']
    ent = analyze_cli('entropy', tmp_path, '--checkpoint', ckpt, '--num_images', 4, '--labels', 'mff')['mff']
    assert len(ent['cls']) == len(ent['patch']) == 12 and ent['max_entropy'] == pytest.approx(math.log(16))
    assert all(0 < h <= math.log(16) + 1e-4 for h in ent['cls'] + ent['patch'])
    hes = analyze_cli('hessian', tmp_path, '--checkpoint', ckpt, '--batches', 2, '--batch_size', 4, '--top_k', 2,
                      '--max_iter', 2, '--labels', 'mff')['mff']
    assert len(hes['eigenvalues']) == 2 and all(len(e) == 2 and all(map(math.isfinite, e)) for e in hes['eigenvalues'])
    rec = analyze_cli('reconstruct', tmp_path, '--checkpoint', ckpt, analysis_run / 'pixmim_mff.pth',
                      analysis_run / 'pilamim.pth', '--num_images', 3)
    assert [r['script'] for r in rec.values()] == ['mae_mff.py', 'pixmim_mff.py', 'pilamim.py']
    assert [len(r['columns']) for r in rec.values()] == [3, 4, 3]        # PixMIM adds its low-pass target
    for r in rec.values():
        assert Image.open(r['png']).size[1] > 3 * 96                    # three rows of upscaled images
    for name in ('frequency', 'attention_entropy', 'hessian'):
        assert (tmp_path / f'{name}.png').exists()


def test_records_of_earlier_versions_are_rebuilt(analysis_run, tmp_path):
    ckpt = torch.load(analysis_run / 'mff' / 'checkpoint-last.pth', weights_only=True)
    old = dict(ckpt, args=dict(ckpt['args'], model='mae_vit_tiny_patch16', patch_size=4))   # before issue 19
    save_checkpoint(old, str(tmp_path / 'old.pth'))
    model, train_args, script = analyze.pretraining_model(str(tmp_path / 'old.pth'))
    assert model.patch_size == 4 and train_args.model == 'mae_vit_tiny_patch4' and script == 'mae_mff.py'


@pytest.mark.parametrize('script', ['mae_mff.py', 'pixmim_mff.py', 'pilamim.py'])
def test_rebuilt_loss_is_the_scripts_own_training_loss(analysis_run, script):
    path = analysis_run / ('mff/checkpoint-last.pth' if script == 'mae_mff.py' else f'{script[:-3]}.pth')
    model, train_args, recorded = analyze.pretraining_model(str(path))
    assert recorded == script and not model.training
    assert type(model).__name__ == {'mae_mff.py': 'MaskedAutoencoder', 'pixmim_mff.py': 'PixMIM',
                                    'pilamim.py': 'PiLaMIM'}[script]
    imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
    out = model(imgs, train_args.mask_ratio, noise=noise)               # the contract: (loss, pred, mask, ...)
    loss, pred, mask = out[:3]
    target = low_freq_target(imgs, 40 * 16 / 224) if script == 'pixmim_mff.py' else imgs   # computed here
    pixel = common.masked_mse(pred, common.pixel_targets(target, 4, train_args.norm_pix_loss), mask)
    if script == 'pilamim.py':                                           # L_pixel + L_latent + L_cls
        assert torch.allclose(out[3][0], pixel) and torch.allclose(loss, sum(out[3])) and loss > pixel
    else:
        assert torch.allclose(loss, pixel)


def test_analyze_bad_input_is_one_line(analysis_run, tmp_path, monkeypatch, capsys):
    ckpt = str(analysis_run / 'mff' / 'checkpoint-last.pth')
    bare = str(tmp_path / 'bare.pth')                                    # official-MAE-style: weights only
    save_checkpoint({'model': torch.load(ckpt, weights_only=True)['model']}, bare)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'analyze.py'), 'hessian', '--checkpoint', bare,
                           '--output_dir', str(tmp_path)], capture_output=True, text=True, cwd=ROOT, env=ENV,
                          timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert 'records no training args' in proc.stderr
    recorded = torch.load(ckpt, weights_only=True)
    save_checkpoint(dict(recorded, script='gone.py'), str(tmp_path / 'gone.pth'))
    save_checkpoint({k: v for k, v in recorded.items() if k != 'script'}, str(tmp_path / 'unrecorded.pth'))
    save_checkpoint(dict(recorded, script='finetune.py'), str(tmp_path / 'finetuned.pth'))
    (tmp_path / 'empty.jsonl').write_text('')
    (tmp_path / 'mae').mkdir()
    (tmp_path / 'mae' / 'log.jsonl').write_text(json.dumps({'epoch': 1, 'step': 4, 'fusion_weights': None}) + '\n')
    small = ['--builtin_size', 32]                                       # an evaluation split of 256 images
    for command, flags, words in [('hessian', ['--checkpoint', tmp_path / 'gone.pth'], 'gone.py, which is not in'),
                                  ('reconstruct', ['--checkpoint', tmp_path / 'unrecorded.pth'], 'records no script'),
                                  ('hessian', ['--checkpoint', tmp_path / 'finetuned.pth'], 'no pre-training script'),
                                  ('fusion', ['--log', tmp_path / 'empty.jsonl'], 'is empty'),
                                  ('fusion', ['--log', tmp_path / 'mae' / 'log.jsonl'], 'no fusion weights'),
                                  ('fusion', ['--log', tmp_path / 'missing.jsonl'], 'does not exist'),
                                  ('entropy', ['--checkpoint', ckpt, '--num_images', 257, *small], 'does not fit'),
                                  ('frequency', ['--checkpoint', ckpt, ckpt], 'share the label'),
                                  ('hessian', ['--checkpoint', ckpt, '--batches', 3, '--batch_size', 16, *small], 'more than')]:
        monkeypatch.setattr(sys, 'argv', ['analyze.py', command, '--output_dir', str(tmp_path), *map(str, flags)])
        with pytest.raises(SystemExit) as e:
            common.run(analyze.main, analyze.get_args_parser())
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and words in err, err


def test_without_matplotlib_the_json_is_still_written(analysis_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)                 # import matplotlib -> ImportError
    analyze_cli('fusion', tmp_path, '--log', analysis_run / 'mff' / 'log.jsonl')
    assert 'pip install matplotlib' in capsys.readouterr().out and not (tmp_path / 'fusion.png').exists()


def test_fusion_weight_curve_follows_the_per_run_log_policy(tmp_path):
    args = argparse.Namespace(output_dir=str(tmp_path))
    fusion, log = tmp_path / 'fusion_weights.jsonl', tmp_path / 'log.jsonl'
    fusion.write_text(''.join(json.dumps({'epoch': e, 'fusion_weights': [0.5, 0.5]}) + '\n' for e in (0.5, 1, 1.5, 2)))
    log.write_text(''.join(json.dumps({'epoch': e}) + '\n' for e in (1, 2)))
    extra = [mae_mff.FUSION_LOG]                                         # MFF's curve file, named by the script
    common.start_log(args, resumed_epoch=1, extra_logs=extra)            # resumed after epoch 1
    assert [json.loads(x)['epoch'] for x in fusion.read_text().splitlines()] == [0.5, 1]
    assert [json.loads(x)['epoch'] for x in log.read_text().splitlines()] == [1]
    common.start_log(args, extra_logs=extra)                             # a fresh run: both start empty
    assert fusion.read_text() == '' and log.read_text() == ''
    fusion.unlink()
    common.start_log(args, extra_logs=extra)
    assert not fusion.exists()                                           # plain MAE leaves no empty curve file


# ---------------------------------------------------------------------------------------------- COPYABLE SCRIPTS
# A method file is copied into other projects: with common.py alone it runs, and a new method made by
# copying a script is trained and analysed with its own loss, with no edit to any other file.

def run_in(folder, *argv, timeout=300):
    """`python *argv` in folder as its only source of modules (the repository is not on the path)."""
    env = {k: v for k, v in ENV.items() if k != 'PYTHONPATH'}
    proc = subprocess.run([sys.executable, *map(str, argv)], cwd=folder, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize('files', [['mae_mff.py'], ['pilamim.py'], ['pixmim_mff.py', 'mae_mff.py']])
def test_a_method_file_copied_with_common_alone_runs_its_laptop_preset(tmp_path, files):
    for name in files + ['common.py']:
        shutil.copy(os.path.join(ROOT, name), tmp_path)
    run_in(tmp_path, files[0], '--preset', 'laptop', '--epochs', '1', '--builtin_size', '128', '--output_dir', 'out')
    assert [r['epoch'] for r in read_log(tmp_path / 'out')] == [1]
    assert torch.load(tmp_path / 'out' / 'checkpoint-1.pth', weights_only=True)['script'] == files[0]


FLIPPED_TARGET_CHECK = '''
import torch
import analyze
from common import masked_mse, pixel_targets
model, args, script = analyze.pretraining_model('out/checkpoint-last.pth')
assert script == 'mae_flip.py' and type(model).__module__ == 'mae_flip', (script, type(model).__module__)
imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
loss, pred, mask = model(imgs, args.mask_ratio, noise=noise)
assert torch.allclose(loss, masked_mse(pred, pixel_targets(imgs.flip(-1), 4, True), mask))    # its own target
assert not torch.allclose(loss, masked_mse(pred, pixel_targets(imgs, 4, True), mask))
for command in (['hessian', '--batches', '1', '--batch_size', '4', '--top_k', '1', '--max_iter', '2'],
                ['reconstruct', '--num_images', '2']):
    analyze.main(analyze.get_args_parser().parse_args([*command, '--checkpoint', 'out/checkpoint-last.pth',
                                                       '--builtin_size', '32', '--labels', 'flip',
                                                       '--num_workers', '0', '--output_dir', 'analysis']))
'''


def test_a_copied_script_with_another_target_trains_and_is_analysed_with_its_own_loss(tmp_path):
    for name in ('common.py', 'mae_mff.py', 'analyze.py'):               # the project as it is, untouched
        shutil.copy(os.path.join(ROOT, name), tmp_path)
    source = (tmp_path / 'mae_mff.py').read_text()
    own = "MAE's is the input itself (PixMIM overrides this).\"\"\"\n        return imgs\n"
    assert source.count(own) == 1
    (tmp_path / 'mae_flip.py').write_text(source.replace(own, own.replace('return imgs', 'return imgs.flip(-1)')))
    run_in(tmp_path, 'mae_flip.py', *METHOD_CLI, '--epochs', '1', '--output_dir', 'out')
    assert torch.load(tmp_path / 'out' / 'checkpoint-last.pth', weights_only=True)['script'] == 'mae_flip.py'
    (tmp_path / 'check.py').write_text(FLIPPED_TARGET_CHECK)
    run_in(tmp_path, 'check.py')
    hessian = json.load(open(tmp_path / 'analysis' / 'hessian.json'))['flip']
    rec = json.load(open(tmp_path / 'analysis' / 'reconstruct.json'))['flip']
    assert hessian['script'] == rec['script'] == 'mae_flip.py' and all(map(math.isfinite, hessian['eigenvalues'][0]))
    assert rec['columns'][-1] == 'target'                                # the mirrored target, not the input


# ---- released weights of every method (common.convert_checkpoint). Each file below is written from the
# format's description (SPEC section 7: key names and shapes typed out here), never by the converter.

from common import read_checkpoint, sincos_pos_embed_2d  # noqa: E402

RELEASED = dict(img_size=32, patch_size=4, embed_dim=192, num_heads=3)  # a ViT-T/4 width, 2-3 blocks


def mm_block(prefix, blk):
    """A timm Block in mmpretrain's TransformerEncoderLayer names."""
    names = {'ln1': blk.norm1, 'attn.qkv': blk.attn.qkv, 'attn.proj': blk.attn.proj, 'ln2': blk.norm2,
             'ffn.layers.0.0': blk.mlp.fc1, 'ffn.layers.1': blk.mlp.fc2}
    return {f'{prefix}.{name}.{p}': getattr(m, p) for name, m in names.items() for p in ('weight', 'bias')}


def openmmlab_state_dict(model):
    """mmpretrain MAE / MFF pre-training names: backbone.* (MAEViT / MFFViT), neck.* (MAEPretrainDecoder)."""
    sd = {'backbone.patch_embed.projection.weight': model.patch_embed.proj.weight,
          'backbone.patch_embed.projection.bias': model.patch_embed.proj.bias,
          'backbone.cls_token': model.cls_token, 'backbone.pos_embed': model.pos_embed,
          'backbone.ln1.weight': model.norm.weight, 'backbone.ln1.bias': model.norm.bias,
          'neck.mask_token': model.mask_token, 'neck.decoder_pos_embed': model.decoder_pos_embed,
          'neck.decoder_embed.weight': model.decoder_embed.weight, 'neck.decoder_embed.bias': model.decoder_embed.bias,
          'neck.ln1.weight': model.decoder_norm.weight, 'neck.ln1.bias': model.decoder_norm.bias,
          'neck.decoder_pred.weight': model.decoder_pred.weight, 'neck.decoder_pred.bias': model.decoder_pred.bias}
    for i, blk in enumerate(model.blocks):
        sd.update(mm_block(f'backbone.layers.{i}', blk))
    for i, blk in enumerate(model.decoder_blocks):
        sd.update(mm_block(f'neck.decoder_blocks.{i}', blk))
    if model.mff is not None:
        for j, proj in enumerate(model.mff.proj):
            sd.update({f'backbone.proj_layers.{j}.weight': proj.weight, f'backbone.proj_layers.{j}.bias': proj.bias})
        sd['backbone.proj_weights'] = model.mff.fusion_logits.reshape(-1, 1, 1, 1)   # (levels, 1, 1, 1)
    return {k: v.detach().clone() for k, v in sd.items()}


def swapped_halves(table):
    """OpenMMLab's sin-cos table: MAE's with its two channel halves swapped."""
    d = table.shape[-1] // 2
    return torch.cat([table[..., d:], table[..., :d]], dim=-1)


class HistoryBuffer:
    """Stands for mmengine's MessageHub buffers that mmselfsup files pickle beside the weights."""
    def __init__(self):
        self.data = [1.0, 2.0]


class PublicPiLaMIMEncoder(nn.Module):
    """PiLaMIM's public encoder layout: learned (L, 1, D) positions (none for cls), timm Blocks without qkv bias
    and with nn.LayerNorm's eps 1e-5 (the Block default of the timm it ran on; timm 1.0 defaults to 1e-6),
    sequence-first tokens."""

    def __init__(self, img_size=32, patch_size=4, embed_dim=192, depth=2, num_heads=3):
        super().__init__()
        L = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * .02)
        self.pos_embedding = nn.Parameter(torch.randn(L, 1, embed_dim) * .02)
        self.patchify = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.transformer = nn.Sequential(*[timm.models.vision_transformer.Block(embed_dim, num_heads,
                                                                                norm_layer=nn.LayerNorm)
                                           for _ in range(depth)])
        self.layer_norm = nn.LayerNorm(embed_dim)
        with torch.no_grad():                     # small tokens: LayerNorm's eps then changes the features
            self.patchify.weight.mul_(0.01)

    def forward(self, imgs):                                              # -> (N, 1 + L, D) after the final norm
        x = self.patchify(imgs).flatten(2).permute(2, 0, 1) + self.pos_embedding   # (L, N, D)
        x = torch.cat([self.cls_token.expand(-1, x.shape[1], -1), x])   # (1 + L, N, D)
        return self.layer_norm(self.transformer(x.transpose(0, 1)))


@pytest.fixture(scope='module')
def released(tmp_path_factory):
    """Small random models and their files in each released format (+ the same weights in our form)."""
    root = tmp_path_factory.mktemp("released")
    torch.manual_seed(0)
    mff = MaskedAutoencoder(**RELEASED, depth=3, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=16,
                            norm_pix_loss=True, mff_layers=(0, 1, 2)).eval()
    with torch.no_grad():
        mff.pos_embed.copy_(swapped_halves(mff.pos_embed))
        mff.decoder_pos_embed.copy_(swapped_halves(mff.decoder_pos_embed))
        mff.mff.fusion_logits.copy_(torch.randn(3))                      # learned: no longer equal
    cfg = "model = dict(type='MFF', backbone=dict(type='MFFViT', arch='t', out_indices=[0, 1, 2]))"
    torch.save({'state_dict': openmmlab_state_dict(mff), 'meta': {'epoch': 300, 'cfg': cfg}}, root / 'mff_mm.pth')
    torch.save({'model': mff.state_dict()}, root / 'mff_ours.pth')

    pixmim = MaskedAutoencoder(**RELEASED, depth=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=16,
                               norm_pix_loss=True).eval()
    radius = 40 * 32 / 224
    i = torch.arange(32.) - 31 / 2
    low_pass = (i[:, None] ** 2 + i[None, :] ** 2 <= radius ** 2).float()  # mmselfsup's ideal low-pass mask
    torch.save({'meta': {'epoch': 800}, 'state_dict': {**openmmlab_state_dict(pixmim),
                                                       'target_generator.low_pass_filter': low_pass},
                'message_hub': {'log_scalars': {'train/loss': HistoryBuffer()}},
                'param_schedulers': [{'last_step': 5}]},
               root / 'pixmim_mm.pth')

    pila = PublicPiLaMIMEncoder().eval()
    target = PublicPiLaMIMEncoder().eval()
    torch.save({**{f'encoder.{k}': v for k, v in pila.state_dict().items()},
                **{f'target_encoder.{k}': v for k, v in target.state_dict().items()},
                'pixel_decoder.head.weight': torch.zeros(48, 64)}, root / 'pilamim_public.pth')
    ours = {'patch_embed.proj.weight': pila.patchify.weight, 'patch_embed.proj.bias': pila.patchify.bias,
            'cls_token': pila.cls_token, 'pos_embed': torch.cat([torch.zeros(1, 192), pila.pos_embedding[:, 0]])[None],
            'norm.weight': pila.layer_norm.weight, 'norm.bias': pila.layer_norm.bias,
            **{f'blocks.{k}': v for k, v in pila.transformer.state_dict().items()}}
    torch.save({'model': ours, 'args': {'norm_eps': 1e-5}}, root / 'pilamim_ours.pth')
    return root, dict(mff=mff, pixmim=pixmim, pila=pila, target=target, low_pass=low_pass, radius=radius)


def test_openmmlab_mff_file_rebuilds_the_whole_model_with_its_stored_position_table(released, capsys):
    root, m = released
    path = str(root / 'mff_mm.pth')
    ckpt, found = read_checkpoint(path)
    assert found.startswith('OpenMMLab MFF pre-training checkpoint, ViT-T/4, 3 blocks at 32 px, 3 fusion levels')
    stored = m['mff'].pos_embed
    assert torch.equal(ckpt['model']['pos_embed'], stored)             # copied, not regenerated
    assert not torch.allclose(stored[0], sincos_pos_embed_2d(192, 8))
    imgs = torch.randn(2, 3, 32, 32)
    encoder, _ = common.load_encoder(path, probe_args('--checkpoint', path))
    with torch.no_grad():                                                 # a regenerated table would differ here
        assert (encoder.forward_features(imgs) - m['mff'].forward_features(imgs)).abs().max() <= 1e-5
        model, train_args, script = analyze.pretraining_model(path)      # decoder, projections and weights too
        assert script == 'mae_mff.py' and model.mff_layers == [0, 1, 2] and train_args.norm_pix_loss
        noise = torch.rand(2, 64)
        fused, ref = model.forward_encoder(imgs, 0.75, noise)[0], m['mff'].forward_encoder(imgs, 0.75, noise)[0]
        assert (fused - ref).abs().max() <= 1e-5
        assert abs(float(model(imgs, 0.75, noise=noise)[0]) - float(m['mff'](imgs, 0.75, noise=noise)[0])) <= 1e-5
    weights = m['mff'].mff.fusion_logits.softmax(0)
    assert torch.allclose(torch.tensor(model.fusion_weights()), weights, atol=1e-4)
    out = root / 'fusion'
    analyze_cli('fusion', out, '--checkpoint', path, '--labels', 'mff')   # paper Fig. 6 for a released file
    assert json.load(open(out / 'fusion.json'))['mff']['fusion_weights'] == model.fusion_weights()
    assert f'mff: fusion weights {model.fusion_weights()} on blocks [0, 1, 2]' in capsys.readouterr().out


def test_openmmlab_pixmim_file_with_training_state_gives_its_filter_and_loss(released):
    root, m = released
    path = str(root / 'pixmim_mm.pth')                                    # holds a pickled non-tensor object too
    ckpt, found = read_checkpoint(path)
    assert found == (f'OpenMMLab PixMIM pre-training checkpoint, ViT-T/4, 2 blocks at 32 px, '
                     f'low-pass radius {ckpt["args"]["lpf_radius"]:g} px') and ckpt['script'] == 'pixmim_mff.py'
    kept = ideal_low_pass(torch.ones(1, 1, 32, 32), ckpt['args']['lpf_radius'])  # our filter at the read radius
    reference = ideal_low_pass(torch.ones(1, 1, 32, 32), m['radius'])
    assert torch.equal(kept, reference)
    model, train_args, script = analyze.pretraining_model(path)
    assert script == 'pixmim_mff.py' and isinstance(model, PixMIM) and train_args.crop == 'simple'
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    with torch.no_grad():
        loss = model(imgs, train_args.mask_ratio, noise=noise)[0]
        _, pred, mask = m['pixmim'](imgs, 0.75, noise=noise)               # the same weights, mask and low-pass target
        expect = common.masked_mse(pred, common.pixel_targets(low_freq_target(imgs, m['radius']), 4, True), mask)
    assert abs(float(loss) - float(expect)) <= 1e-5


def test_pilamim_public_state_dict_needs_its_layernorm_eps(released):
    root, m = released
    path = str(root / 'pilamim_public.pth')
    ckpt, found = read_checkpoint(path)
    assert 'PiLaMIM public-code state dict, ViT-T/4, 2 blocks at 32 px' in found and 'pixel_decoder' in found
    encoder, _ = common.load_encoder(path, probe_args('--checkpoint', path))
    imgs = torch.randn(2, 3, 32, 32)
    target = ViTEncoder(**RELEASED, depth=2, qkv_bias=False, norm_eps=1e-5)
    target.load_state_dict(common.encoder_state_dict(ckpt['model'], 'target_encoder.'))
    eps_6 = ViTEncoder(**RELEASED, depth=2, qkv_bias=False, norm_eps=1e-6)
    eps_6.load_state_dict(common.encoder_state_dict(ckpt['model']))
    with torch.no_grad():
        reference = m['pila'](imgs)
        assert (encoder.forward_features(imgs) - reference).abs().max() <= 1e-5
        assert (target.eval().forward_features(imgs) - m['target'](imgs)).abs().max() <= 1e-5
        assert (eps_6.eval().forward_features(imgs) - reference).abs().max() > 1e-3   # MAE's eps is wrong here


@pytest.mark.parametrize('converted, original', [('mff_mm.pth', 'mff_ours.pth'),
                                                 ('pilamim_public.pth', 'pilamim_ours.pth')])
def test_knn_top1_is_the_same_on_a_released_file_and_on_our_form(released, tmp_path, capsys, converted, original):
    root, _ = released
    top1 = [probe.main(probe_args('--checkpoint', str(root / name), '--knn', '--builtin_size', '256',
                                  '--output_dir', str(tmp_path)))['top1'] for name in (converted, original)]
    assert top1[0] == top1[1]
    assert f'{root / converted} (' in capsys.readouterr().out             # the start line says what it read


def test_official_mae_finetuned_file_evaluates_and_probes(tmp_path):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    vit = VisionTransformer(**RELEASED, depth=2, global_pool='avg', num_classes=4).eval()
    assert 'norm.weight' not in vit.state_dict()                         # fc_norm + head, no norm
    path = tmp_path / 'mae_finetuned_vit_tiny.pth'
    torch.save({'model': vit.state_dict()}, path)
    assert read_checkpoint(str(path))[1] == ('official MAE fine-tuned (fc_norm + head) checkpoint, ViT-T/4, '
                                             '2 blocks at 32 px')
    # The same classifier as an mmpretrain fine-tuned file (backbone ln2 = fc_norm, head.fc = head) reads back as it.
    mm = {'backbone.patch_embed.projection.weight': vit.patch_embed.proj.weight,
          'backbone.patch_embed.projection.bias': vit.patch_embed.proj.bias, 'backbone.cls_token': vit.cls_token,
          'backbone.pos_embed': vit.pos_embed, 'backbone.ln2.weight': vit.fc_norm.weight,
          'backbone.ln2.bias': vit.fc_norm.bias, 'head.fc.weight': vit.head.weight, 'head.fc.bias': vit.head.bias,
          **{k: v for i, blk in enumerate(vit.blocks) for k, v in mm_block(f'backbone.layers.{i}', blk).items()}}
    torch.save({'state_dict': mm, 'meta': {}}, tmp_path / 'mm_finetuned.pth')
    ckpt, found = read_checkpoint(str(tmp_path / 'mm_finetuned.pth'))
    assert found == 'OpenMMLab MAE fine-tuned checkpoint, ViT-T/4, 2 blocks at 32 px'
    assert ckpt['model'].keys() == vit.state_dict().keys()
    assert all(torch.equal(ckpt['model'][k], v) for k, v in vit.state_dict().items())
    result = finetune_run('--eval', '--checkpoint', path, '--output_dir', tmp_path, *FT_CLI, '--builtin_size', '256')
    val = common.build_dataset(argparse.Namespace(data_path='', builtin_size=256, input_size=32, builtin_label='shape',
                                                  seed=0), 'val', eval_transform(32))
    imgs, labels = map(torch.stack, zip(*[(x, torch.tensor(y)) for x, y in map(val.__getitem__, range(len(val)))]))
    with torch.no_grad():
        assert result['top1'] == pytest.approx(100 * (vit(imgs).argmax(1) == labels).float().mean().item(), abs=0.01)
        encoder = probe.load_encoder(str(path), probe_args('--checkpoint', str(path)))[0]
        tokens = encoder.forward_blocks(encoder.embed(imgs[:4]), [1])[-1]
        assert (encoder.norm(tokens[:, 1:].mean(1)) -
                vit.forward_head(vit.forward_features(imgs[:4]), pre_logits=True)).abs().max() <= 1e-5


def test_timm_hub_name_reads_the_model_and_offline_names_the_cache(tmp_path, monkeypatch, capsys):
    name = 'vit_tiny_patch16_224.augreg_in21k'
    small = dict(img_size=32, patch_size=4, depth=2)
    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, **small).eval()
    torch.save(vit.state_dict(), tmp_path / 'local.pth')                  # what the hub would give, offline
    create = timm.create_model
    monkeypatch.setattr(timm, 'create_model', lambda n, **kw: create(
        n, **kw, **small, pretrained_cfg_overlay=dict(file=str(tmp_path / 'local.pth'))))
    ckpt, found = read_checkpoint(f'timm:{name}')
    assert found == f'timm hub model {name}, ViT-T/4, 2 blocks at 32 px'
    encoder = probe.load_encoder(f'timm:{name}', probe_args('--checkpoint', f'timm:{name}'))[0]
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (encoder.forward_features(imgs) - vit.forward_features(imgs)).abs().max() <= 1e-5
    top1 = [probe.main(probe_args('--checkpoint', c, '--knn', '--builtin_size', '256', '--output_dir', str(tmp_path)))
            ['top1'] for c in (f'timm:{name}', str(tmp_path / 'local.pth'))]
    assert top1[0] == top1[1]
    monkeypatch.undo()
    # Offline, with empty caches: one line naming the cache it looked in (HF_HUB_OFFLINE: no download is tried).
    env = {**ENV, 'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'hf'), 'TORCH_HOME': str(tmp_path / 'torch')}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'probe.py'), '--checkpoint', f'timm:{name}', '--knn',
                           '--output_dir', str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f'not in the Hugging Face cache {tmp_path / "hf" / "hub"}' in lines[0] and 'timm:' + name in lines[0]


class DistributedDataParallel(nn.Module):
    """Pickles like a DDP-wrapped module (PiLaMIM's linear-probe files): a wrapper with .module."""
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_pickled_module_and_unknown_state_dict_are_one_line_errors(tmp_path):
    torch.save(DistributedDataParallel(nn.Linear(2, 2)), tmp_path / 'ddp.pth')
    torch.save(nn.Linear(2, 2), tmp_path / 'module.pth')
    torch.save({'fc.weight': torch.zeros(2, 2), 'fc.bias': torch.zeros(2)}, tmp_path / 'unknown.pth')
    for name, words in (('ddp.pth', 'is a pickled module (test_smoke.DistributedDataParallel), not a state dict'),
                        ('module.pth', 'is a pickled module (torch.nn.modules.linear.Linear), not a state dict'),
                        ('unknown.pth', "is in no format this project reads (first keys ['fc.weight', 'fc.bias']): "
                                        'it reads ours')):
        with pytest.raises(InputError) as e:
            read_checkpoint(str(tmp_path / name))
        assert words in str(e.value) and '\n' not in str(e.value)
    assert 'OpenMMLab' in str(e.value) and 'PiLaMIM' in str(e.value) and 'timm:NAME' in str(e.value)


# =======================================================================================

# Input pipeline (uint8 to the device, JPEG draft mode, --gpu_decode, persistent workers) and the
# code paths that otherwise run only on a GPU (--compile, bf16 autocast), exercised on the CPU.

import bench  # noqa: E402


def write_jpegs(root, n=8, classes=('a', 'b')):
    """root/<class>/<i>.jpg: bench.py's natural-looking JPEGs, 80x60 and 60x80 (at 16 px, draft mode
    reduces many crops by 2 or 4)."""
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            bench.natural_jpeg(root / c / f'{c}{i}.jpg', 100 * k + i, (80, 60) if i % 2 else (60, 80))


@pytest.fixture(scope='module')
def jpeg_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('jpegs')
    write_jpegs(root / 'train')
    write_jpegs(root / 'val', n=4)
    return root


def loader_batch(dataset, batch_size=16, rng_after=None):
    """The first training batch of epoch 0, RNGs set as the scripts set them (transforms draw from the
    torch RNG with 0 workers: rng_after collects its next number, which tells the draws were the same)."""
    loader, sampler = make_loader(dataset, batch_size, 0, 1, 0, seed=0)
    common.seed_epoch(0, 0, 0)
    sampler.set_epoch(0)
    batch = next(iter(loader))[0]
    if rng_after is not None:
        rng_after.append(torch.rand(1))
    return batch


def test_uint8_batches_normalised_on_the_device_are_todays_pixels(jpeg_folders):
    args = argparse.Namespace(data_path=str(jpeg_folders), input_size=16, builtin_size=32, builtin_label='shape',
                              seed=0, exact_decode=True, gpu_decode=False)
    cpu = torch.device('cpu')
    for kind, today in (('rrc', train_transform(16, 'rrc')), ('simple', train_transform(16, 'simple')),
                        ('center', eval_transform(16))):
        view = common.train_view(args, kind) if kind != 'center' else common.eval_view(args)
        after = []
        batch = loader_batch(common.build_dataset(args, 'train', view), rng_after=after)
        assert batch.dtype == torch.uint8 and batch.shape == (16, 3, 16, 16)         # 4x fewer bytes to copy
        reference = loader_batch(common.build_dataset(args, 'train', today), rng_after=after)
        assert (common.to_device(batch, cpu) - reference).abs().max() <= 1e-5, kind
        for mode, tolerance in (('draft', 0.1), ('gpu', 0.02)):                  # mean |diff|, normalised units
            fast = common.ImageView(kind, 16, mode, view.scale)
            got = loader_batch(common.build_dataset(argparse.Namespace(**{**vars(args), 'exact_decode': False,
                                                                          'gpu_decode': mode == 'gpu'}), 'train', fast),
                               rng_after=after)
            assert isinstance(got, common.EncodedBatch) == (mode == 'gpu')
            diff = (common.to_device(got, cpu) - reference).abs()
            assert diff.mean() < tolerance, (kind, mode, diff.mean())
        assert all(torch.equal(a, after[0]) for a in after), kind     # the same draws on every path
    shapes = SyntheticShapes(16, 16, transform=common.train_view(args, 'rrc'))  # built-in data: the exact path
    assert torch.equal(common.to_device(loader_batch(shapes), cpu),
                       loader_batch(SyntheticShapes(16, 16, transform=train_transform(16))))


def test_persistent_workers_draw_what_fresh_workers_draw():
    data = SyntheticShapes(32, 16, transform=common.ImageView('rrc', 16))

    def epoch(loader, sampler, e):
        common.seed_epoch(0, e, 0)
        sampler.set_epoch(e)
        return [x for x, _ in loader], torch.rand(1)                     # and the main RNG the masks draw from

    loader, sampler = make_loader(data, 8, 0, 1, 1, seed=0)
    assert loader.persistent_workers and loader.prefetch_factor == 4
    epoch(loader, sampler, 0)
    continued = epoch(loader, sampler, 1)                                # same worker process as epoch 0
    resumed = epoch(*make_loader(data, 8, 0, 1, 1, seed=0), 1)           # a fresh worker, as after --resume
    sampler = torch.utils.data.DistributedSampler(data, 1, 0, shuffle=True, seed=0, drop_last=True)
    before = epoch(torch.utils.data.DataLoader(data, 8, sampler=sampler, num_workers=1), sampler, 1)  # old loader
    for other in (resumed, before):
        assert all(torch.equal(a, b) for a, b in zip(continued[0], other[0])) and torch.equal(continued[1], other[1])


def test_gpu_decode_trains_resumes_exactly_and_names_a_corrupt_file(jpeg_folders, tmp_path, capsys):
    data = tmp_path / 'data'
    shutil.copytree(jpeg_folders, data)
    Image.open(data / 'train' / 'a' / 'a0.jpg').save(data / 'train' / 'a' / 'png.png')        # CPU fallbacks
    Image.open(data / 'train' / 'a' / 'a1.jpg').convert('CMYK').save(data / 'train' / 'b' / 'cmyk.jpg')
    flags = ['--data_path', str(data), '--gpu_decode', '--num_workers', '1', '--batch_size', '6',
             '--epochs', '2', '--save_freq', '1']
    full = in_process('mae_mff.py', tmp_path / 'full', *flags)
    assert 'JPEG decode on the device (--gpu_decode)' in capsys.readouterr().out
    resumed_dir = tmp_path / 'resumed'
    resumed_dir.mkdir()
    shutil.copy(tmp_path / 'full' / 'checkpoint-1.pth', resumed_dir / 'checkpoint-last.pth')
    resumed = in_process('mae_mff.py', resumed_dir, *flags, '--resume', 'auto')
    assert full[-1]['loss'] == resumed[-1]['loss'] and full[-1]['step'] == resumed[-1]['step'] == 6
    a = torch.load(tmp_path / 'full' / 'checkpoint-2.pth', weights_only=True)['model']
    b = torch.load(resumed_dir / 'checkpoint-2.pth', weights_only=True)['model']
    assert all(torch.equal(a[k], b[k]) for k in a)
    good = (data / 'train' / 'a' / 'a2.jpg').read_bytes()
    (data / 'train' / 'a' / 'broken.jpg').write_bytes(good[:len(good) // 3])    # a header, then cut short
    for decode in (['--gpu_decode'], []):                                # the device path and the draft path
        with pytest.raises(InputError, match=r'cannot read image .*broken\.jpg .*delete or replace'):
            in_process('mae_mff.py', tmp_path / 'bad', *flags[:2], *decode, '--batch_size', '19', '--epochs', '1')


def test_gpu_decode_and_exact_decode_refused_where_they_cannot_work(pretrained, tmp_path):
    with pytest.raises(InputError, match='built-in images are made in memory'):
        mae_mff.main(cli_args('--gpu_decode', '--output_dir', tmp_path))
    with pytest.raises(InputError, match='exclude each other'):
        mae_mff.main(cli_args('--gpu_decode', '--exact_decode', '--output_dir', tmp_path))
    with pytest.raises(InputError, match="finetune.py keeps timm's CPU augmentations"):
        finetune_run('--checkpoint', pretrained, '--output_dir', tmp_path, *FT_CLI, '--gpu_decode')


# One optimizer step per epoch on the smallest settings each script takes (inductor compiles are slow).
STEP_TINY = {
    'mae_mff.py': [*METHOD_CLI, '--depth', '2', '--mff_layers', '0,1', '--builtin_size', '8', '--batch_size', '8'],
    'pixmim_mff.py': [*METHOD_CLI, '--depth', '2', '--mff_layers', '0,1', '--builtin_size', '8', '--batch_size', '8'],
    'pilamim.py': [*METHOD_CLI, '--depth', '2', '--builtin_size', '8', '--batch_size', '8'],
    'finetune.py': [*FT_CLI, '--builtin_size', '16', '--batch_size', '16', '--accum_iter', '1'],
}


def step_run(script, out, pretrained, *extra):
    module = importlib.import_module(script[:-3])
    flags = STEP_TINY[script] + (['--checkpoint', pretrained] if script == 'finetune.py' else [])
    module.main(module.get_args_parser().parse_args([*map(str, flags), '--output_dir', str(out), *extra]))
    return read_log(out)


@pytest.mark.parametrize('script', ['mae_mff.py', 'pixmim_mff.py', 'pilamim.py', 'finetune.py'])
def test_compiled_steps_match_eager_and_a_compiled_run_resumes(script, pretrained, tmp_path):
    eager = step_run(script, tmp_path / 'eager', pretrained)             # 2 epochs of one step each
    compiled = step_run(script, tmp_path / 'compiled', pretrained, '--compile', '--epochs', '1')
    assert compiled[0]['loss'] == pytest.approx(eager[0]['loss'], abs=1e-4)  # same masks, drop paths, Mixup
    resumed = step_run(script, tmp_path / 'compiled', pretrained, '--compile', '--resume', 'auto')
    assert [r['epoch'] for r in resumed] == [1, 2] and resumed[1]['loss'] == pytest.approx(eager[1]['loss'], abs=1e-4)
    a = torch.load(tmp_path / 'eager' / 'checkpoint-last.pth', weights_only=True)['model']
    b = torch.load(tmp_path / 'compiled' / 'checkpoint-last.pth', weights_only=True)['model']
    assert a.keys() == b.keys()                                          # no '_orig_mod.' prefixes
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_bf16_autocast_on_cpu_runs_every_script_with_fp32_fusion(pretrained, tmp_path, monkeypatch):
    monkeypatch.setattr(common, 'BF16_ON_CPU', True)                     # common.autocast: the CUDA path's casts
    seen = []
    fusion_forward = mae_mff.MultiLevelFusion.forward

    def recording(self, levels):
        out = fusion_forward(self, levels)
        seen.append((torch.is_autocast_enabled('cpu'), self.proj[0](levels[0]).dtype, out.dtype))
        return out

    monkeypatch.setattr(mae_mff.MultiLevelFusion, 'forward', recording)
    for script in STEP_TINY:
        log = step_run(script, tmp_path / script, pretrained, '--epochs', '1')
        assert math.isfinite(log[-1]['loss']), script
    assert len(seen) == 2 and all(s == (True, torch.bfloat16, torch.float32) for s in seen), seen   # MFF-MAE, MFF-PixMIM
    result = probe.main(probe_args('--checkpoint', pretrained, '--knn', '--builtin_size', '64',
                                   '--output_dir', str(tmp_path / 'probe')))
    assert math.isfinite(result['top1'])

# ----------------------------------------------------------------------------------------------
# DOCS: README.md and docs/*.md cannot drift from the files and flags they describe

DOCS = ['README.md', *sorted(os.path.join('docs', f) for f in os.listdir(os.path.join(ROOT, 'docs'))
                             if f.endswith('.md'))]


def heading_anchors(markdown):
    """GitHub's anchors: lower case, punctuation dropped, spaces -> '-'."""
    return {re.sub(r'[^\w\- ]', '', h.strip().lower()).replace(' ', '-')
            for h in re.findall(r'^#+ (.+)$', re.sub(r'```.*?```', '', markdown, flags=re.S), flags=re.M)}


def doc_bash_commands(markdown):
    """-> [(script, argv)] for every project script called in a ```bash block (continuations joined,
    NAME=value assignments of the block substituted, comments dropped)."""
    commands = []
    for block in re.findall(r'```bash\n(.*?)```', markdown, flags=re.S):
        variables = {}
        for line in block.replace('\\\n', ' ').splitlines():
            assignment = re.fullmatch(r'\s*([A-Z_]+)=(.*)', line)
            if assignment:
                variables[assignment.group(1)] = ' '.join(shlex.split(assignment.group(2)))
                continue
            for name, value in variables.items():
                line = line.replace(f'${name}', value)
            words = shlex.split(line, comments=True)
            scripts = [i for i, w in enumerate(words) if w.endswith('.py') and os.path.isfile(os.path.join(ROOT, w))]
            if scripts and words[0] in ('python', 'python3', 'torchrun') and '-m' not in words[:scripts[0]]:
                commands.append((words[scripts[0]], words[scripts[0] + 1:]))
    return commands


@pytest.mark.parametrize('doc', DOCS)
def test_doc_links_and_figures_exist(doc):
    text = open(os.path.join(ROOT, doc)).read()
    here = os.path.dirname(os.path.join(ROOT, doc))
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
        if re.match(r'[a-z]+:', target):
            continue                                                     # web links are not checked
        path, _, anchor = target.partition('#')
        file = os.path.normpath(os.path.join(here, path)) if path else os.path.join(ROOT, doc)
        assert os.path.exists(file), f'{doc}: the link {target} points at nothing'
        if anchor:
            assert anchor in heading_anchors(open(file).read()), f'{doc}: no heading #{anchor} in {path or doc}'
    for figure in re.findall(r'(?<![\w/.])((?:\.\./)?figures/[\w./-]+\.png)', text):
        base = here if figure.startswith('../') else ROOT               # prose names paths from the repo root
        assert os.path.isfile(os.path.join(base, figure)), f'{doc}: {figure} does not exist'


@pytest.mark.parametrize('doc', DOCS)
def test_doc_commands_parse_with_their_scripts_flags(doc, capsys):
    commands = doc_bash_commands(open(os.path.join(ROOT, doc)).read())
    assert commands or doc != 'README.md', 'README.md shows no command'
    for script, argv in commands:
        parser = importlib.import_module(script[:-3]).get_args_parser()
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f'{doc}: `{script} {" ".join(argv)}` does not parse: {capsys.readouterr().err.strip()}')


def test_doc_command_extraction_sees_continuations_variables_and_comments():
    text = ('```bash\nC="--checkpoint a.pth b.pth"\npython analyze.py frequency $C   # two\n'
            'torchrun --nproc_per_node=8 probe.py --checkpoint x \\\n    --pool abmilp\npython -m pytest -q test_smoke.py\n```\n'
            '```python\npython probe.py --nope\n```\n')
    assert doc_bash_commands(text) == [('analyze.py', ['frequency', '--checkpoint', 'a.pth', 'b.pth']),
                                       ('probe.py', ['--checkpoint', 'x', '--pool', 'abmilp'])]
    assert heading_anchors('## PiLaMIM (`pilamim.py`)\n```bash\n# not a heading\n```') == {'pilamim-pilamimpy'}


def test_probe_on_builtin_data_without_the_preset_names_it(pretrained, tmp_path):
    args = probe.get_args_parser().parse_args(['--checkpoint', pretrained, '--output_dir', str(tmp_path)])
    with pytest.raises(InputError, match=r'built-in data has 4096 training images, fewer than the effective batch '
                                         r'16384 .*add --preset laptop'):
        probe.main(args)
