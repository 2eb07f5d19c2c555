"""Tests of probe.py (frozen-encoder evaluation). Tiny models, built-in data; the file runs in about a minute on 2 cores."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch

import probe
from common import InputError, SyntheticShapes, ViTEncoder, eval_transform, make_loader, save_checkpoint, train_transform
from mae_mff import MaskedAutoencoder

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2)


def probe_args(*flags):
    args = probe.get_args_parser().parse_args(list(flags))
    args.world_size = 1
    probe.resolve_defaults(args)
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
                     'args': {'model': 'mae_vit_tiny_patch16', 'input_size': 32, 'patch_size': 4}}, path)
    return path


def test_abmilp_attention_is_a_distribution_over_patches_only():
    torch.manual_seed(0)
    encoder = ViTEncoder(**TINY).eval()
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = probe.features(encoder, imgs, 'abmilp', 1)             # (N, L, D): cls excluded
        assert torch.equal(tokens, encoder.forward_features(imgs)[:, 1:])
        pool = probe.AbMILPool(64, depth=1)
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
    encoder = ViTEncoder(**TINY).eval()
    data = SyntheticShapes(40, 32, transform=eval_transform(32))
    loader = make_loader(data, 16, 0, 1, 0, train=False)[0]
    for pool in ('cls', 'mean', 'abmilp'):
        args = probe_args('--checkpoint', 'x', '--pool', pool, '--layer', '0', '--batch_size', '16')
        cache_x, cache_y = probe.extract(encoder, loader, pool, 0, torch.device('cpu'))
        cached = list(probe.batches(encoder, (cache_x, cache_y), args, torch.device('cpu'), shuffle=False))
        fresh = list(probe.batches(encoder, loader, args, torch.device('cpu'), shuffle=False))
        assert len(cached) == len(fresh) == 3
        for (xc, yc), (xf, yf) in zip(cached, fresh):
            assert torch.equal(yc, yf) and torch.allclose(xc, xf, atol=1e-6)


@pytest.mark.parametrize('pool', ['cls', 'abmilp'])
def test_encoder_is_untouched_by_probing(pool, tmp_path):
    torch.manual_seed(0)
    encoder = ViTEncoder(**TINY).requires_grad_(False).eval()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    args = probe_args('--checkpoint', 'x', '--pool', pool, '--epochs', '2', '--batch_size', '16',
                      '--output_dir', str(tmp_path), '--layer', '1')
    train = SyntheticShapes(32, 32, transform=probe.probe_train_transform(32))
    val = SyntheticShapes(16, 32, seed=1, transform=eval_transform(32))
    val_src = make_loader(val, 16, 0, 1, 0, train=False)[0]
    # re-encoding path (augmented): the encoder runs inside every training step
    probe.train_probe(encoder, make_loader(train, 16, 0, 1, 0)[0], val_src, 4, args, torch.device('cpu'))
    # cached path
    cache = probe.extract(encoder, make_loader(train, 16, 0, 1, 0, train=False)[0], pool, 1, torch.device('cpu'))
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


def test_official_and_timm_format_weights_load(tmp_path):
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 32, 32)
    mae = MaskedAutoencoder(**TINY, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2).eval()
    save_checkpoint({'model': mae.state_dict()}, str(tmp_path / 'official.pth'))   # official MAE layout
    vit = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=4, embed_dim=64,
                            depth=2, num_heads=2, num_classes=10).eval()
    save_checkpoint(vit.state_dict(), str(tmp_path / 'timm.pth'))     # bare timm state dict, with head.*
    for name, reference in (('official', mae.forward_features), ('timm', vit.forward_features)):
        path = str(tmp_path / f'{name}.pth')
        with pytest.raises(InputError, match='--num_heads'):           # width 64 is no standard size
            probe.load_encoder(path, probe_args('--checkpoint', path))
        encoder = probe.load_encoder(path, probe_args('--checkpoint', path, '--num_heads', '2'))
        with torch.no_grad():
            assert torch.allclose(encoder.forward_features(imgs), reference(imgs), atol=1e-5)
        assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


def test_checkpoint_of_another_size_is_a_one_line_error(pretrained, tmp_path):
    with pytest.raises(InputError, match='another architecture'):
        probe.load_encoder(pretrained, probe_args('--checkpoint', pretrained, '--input_size', '64'))
    proc = subprocess.run([sys.executable, os.path.join(HERE, 'probe.py'), '--checkpoint', pretrained,
                           '--model', 'mae_vit_small_patch16', '--output_dir', str(tmp_path)],
                          capture_output=True, text=True, cwd=HERE, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'another architecture' in lines[0] and 'embed_dim 192 there, 384 asked' in lines[0]
    with pytest.raises(InputError, match='--layer 5 does not exist'):
        probe.main(probe_args('--checkpoint', pretrained, '--layer', '5', '--output_dir', str(tmp_path)))
    with pytest.raises(InputError, match='does not exist'):
        probe.load_encoder(str(tmp_path / 'missing.pth'), probe_args('--checkpoint', 'x'))


def test_token_cache_that_does_not_fit_is_refused(monkeypatch):
    encoder = ViTEncoder(**TINY).eval()
    loader = make_loader(SyntheticShapes(8, 32), 8, 0, 1, 0, train=False)[0]
    monkeypatch.setattr(probe, 'free_memory', lambda device: 1000)
    with pytest.raises(InputError, match='--aug'):
        probe.extract(encoder, loader, 'abmilp', 1, torch.device('cpu'))
