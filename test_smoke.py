"""Tests: `python -m pytest -q test_smoke.py` (CPU, a few minutes on 2 cores).

Each test checks a behaviour that could break: tensor layouts, masking, the loss, MFF,
checkpoints and resume, DDP, timm compatibility, and the one-line errors for bad input.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import common
import mae_mff
from common import InputError, ViTEncoder, patchify, random_masking, unpatchify
from mae_mff import MaskedAutoencoder, paper_mff_layers

ROOT = os.path.dirname(os.path.abspath(__file__))
# One thread per script run: 2-thread OpenMP crawls when other processes share the 2 cores.
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2,
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
# A fast CLI setting: 16 px images, 16 patches, tiny ViT (depth 12, width 192), 4 steps per epoch.
CLI_TINY = ['--model', 'mae_vit_tiny_patch16', '--input_size', '16', '--patch_size', '4',
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

    # The official forward, step by step (SPEC §1), against ours with the same seed.
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
    assert ckpt['epoch'] == 3 and ckpt['step'] == 12 and ckpt['args']['model'] == 'mae_vit_tiny_patch16'
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
if world > 1:
    dist.destroy_process_group()
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
        mae_mff.main(cli_args('--model', 'mae_vit_small_patch16', '--resume', 'auto', '--output_dir', tmp_path))
    with pytest.raises(InputError, match='does not match'):
        mae_mff.main(cli_args('--mff_layers', 'none', '--resume', 'auto', '--output_dir', tmp_path))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cli('mae_mff.py', *CLI_TINY, '--epochs', '1', '--output_dir', tmp_path)
    good = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    proc = cli('mae_mff.py', *CLI_TINY, '--lr', '1e35', '--output_dir', tmp_path, '--resume', 'auto',
               check=False)
    assert proc.returncode == 2 and 'non-finite loss at step' in proc.stderr, proc.stderr
    after = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    assert after['epoch'] == 1
    assert all(torch.equal(good['model'][k], after['model'][k]) for k in good['model'])
