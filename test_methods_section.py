"""Tests of pixmim_mff.py and pilamim.py (filter, target, EMA, target order, cls switch, resume).

Small models on CPU; the CLI runs use a 16 px built-in dataset so the file stays well under 90 s.
"""
import importlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import common
from mae_mff import MaskedAutoencoder
from pilamim import PiLaMIM, momentum_at
from pixmim_mff import ideal_low_pass, low_freq_target, pixmim_loss

HERE = os.path.dirname(os.path.abspath(__file__))
# One thread: on a small shared CPU, thread sync costs far more than these tiny matmuls gain (~10x).
torch.set_num_threads(1)
ONE_THREAD = {**os.environ, 'OMP_NUM_THREADS': '1'}
MEAN = torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
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
    model = MaskedAutoencoder(**TINY, norm_pix_loss=True, mff_layers=[0, 1])
    torch.manual_seed(1)
    loss = pixmim_loss(model, imgs, 0.75, 3.)
    torch.manual_seed(1)
    ref = model(imgs, 0.75, target_imgs=expected)[0]                      # same mask
    torch.manual_seed(1)
    plain = model(imgs, 0.75)[0]
    assert torch.allclose(loss, ref, atol=1e-6) and not torch.allclose(loss, plain)


# ---------------------------------------------------------------------------------------------- PiLaMIM

def tiny_pilamim(**kw):
    torch.manual_seed(0)
    return PiLaMIM(**{**TINY, **kw})


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
    opt_params = {id(p) for g in common.param_groups(model, 0.05) for p in g['params']}
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
    _, _, l_lat, l_cls = model(imgs)
    assert l_lat.item() < 1e-10 and l_cls.item() < 1e-10                 # perfect predictor -> zero loss
    # Controls: the test notices a pairing with other patches, or the public code's shuffled targets.
    model.latent_decoder = Oracle(torch.cat([oracle[:, :1], oracle[:, 1:].roll(1, dims=1)], dim=1))
    assert model(imgs)[2].item() > 1e-2
    model.latent_decoder = Oracle(oracle)
    unshuffled = model.target_features
    model.target_features = lambda x: (lambda t: torch.cat(
        [t[:, :1], t[:, 1:][:, torch.randperm(t.shape[1] - 1)]], dim=1))(unshuffled(x))
    assert model(imgs)[2].item() > 1e-2


def test_decoder_returns_original_patch_order():
    model = tiny_pilamim(decoder_depth=0)                                 # decoder = embed + pos + norm + head
    dec = model.latent_decoder
    x = torch.randn(2, 1 + 4, 32)
    ids_keep, _, ids_restore = common.random_masking(2, 16, 0.75, 'cpu')
    out = dec(x, ids_restore)                                             # (2, 17, 32)
    for n in range(2):
        for k in range(4):
            pos = ids_keep[n, k] + 1
            ref = dec.decoder_pred(dec.decoder_norm(dec.decoder_embed(x[n, k + 1]) + dec.decoder_pos_embed[0, pos]))
            assert torch.allclose(out[n, pos], ref, atol=1e-5)


def test_no_cls_loss_switch():
    imgs = torch.randn(2, 3, 16, 16)
    torch.manual_seed(3)
    loss, l_pix, l_lat, l_cls = tiny_pilamim()(imgs)
    assert l_cls.item() > 0 and torch.allclose(loss, l_pix + l_lat + l_cls)
    torch.manual_seed(3)
    loss, l_pix, l_lat, l_cls = tiny_pilamim(cls_loss=False)(imgs)
    assert l_cls.item() == 0 and torch.allclose(loss, l_pix + l_lat)


# ---------------------------------------------------------------------------------------------- CLI

CLI = ['--model', 'mae_vit_tiny_patch16', '--input_size', '16', '--patch_size', '4', '--decoder_embed_dim', '32',
       '--decoder_depth', '1', '--decoder_num_heads', '2', '--builtin_size', '32', '--batch_size', '16',
       '--accum_iter', '1', '--epochs', '2', '--warmup_epochs', '1', '--num_workers', '0', '--save_freq', '1',
       '--print_freq', '1']


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]


def cli(script, out, *extra):
    """The script as a user runs it (a fresh process)."""
    r = subprocess.run([sys.executable, os.path.join(HERE, script), *CLI, '--output_dir', str(out), *extra],
                       capture_output=True, text=True, cwd=HERE, timeout=300, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-2000:]
    return read_log(out)


def in_process(script, out, *extra):
    """Same run without the interpreter start-up (keeps the file fast)."""
    module = importlib.import_module(script[:-3])
    module.main(module.get_args_parser().parse_args([*CLI, '--output_dir', str(out), *extra]))
    return read_log(out)


@pytest.mark.parametrize('script,extra', [('pixmim_mff.py', ['--mff_layers', '0,11']),
                                          ('pilamim.py', ['--no_cls_loss', '--latent_target', 'layernorm'])])
def test_cli_train_and_exact_resume(tmp_path, script, extra):
    full = in_process(script, tmp_path / 'full', *extra)                 # 2 epochs straight
    resumed_dir = tmp_path / 'resumed'
    resumed_dir.mkdir()
    shutil.copy(tmp_path / 'full' / 'checkpoint-1.pth', resumed_dir / 'checkpoint-last.pth')  # "killed" after 1
    resumed = cli(script, resumed_dir, '--resume', 'auto', *extra)
    assert [r['epoch'] for r in resumed] == [2] and full[-1]['step'] == resumed[-1]['step'] == 4
    a = torch.load(tmp_path / 'full' / 'checkpoint-2.pth', weights_only=True)
    b = torch.load(resumed_dir / 'checkpoint-2.pth', weights_only=True)
    for k in a['model']:                                                  # target encoder + EMA position too
        assert torch.allclose(a['model'][k], b['model'][k], atol=1e-6), k
    assert full[-1]['loss'] == pytest.approx(resumed[-1]['loss'], rel=1e-5)
    if script == 'pilamim.py':
        assert any(k.startswith('target_encoder.') for k in a['model'])
        assert resumed[-1]['cls'] == 0 and full[-1]['ema_momentum'] == resumed[-1]['ema_momentum'] == 1.0
    enc = common.ViTEncoder(16, 4, embed_dim=192, depth=12, num_heads=3)  # what probe.py does
    common.load_matching_state(enc, common.encoder_state_dict(a['model']), 'checkpoint')


@pytest.mark.parametrize('script,flags,words', [('pixmim_mff.py', ['--lpf_radius', '-1'], 'lpf_radius'),
                                                ('pilamim.py', ['--accum_iter', '8'], 'accum_iter')])
def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys, script, flags, words):
    module = importlib.import_module(script[:-3])
    monkeypatch.setattr(sys, 'argv', [script, *CLI, '--output_dir', str(tmp_path), *flags])
    with pytest.raises(SystemExit) as e:
        common.run(module.main, module.get_args_parser(), module.PRESETS)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and words in err
