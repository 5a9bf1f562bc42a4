"""from_torch against efficientnet_pytorch (B0-B7) and efficientnet_lite_pytorch (Lite0-Lite4),
plus the strictness checks, our msgpack format and the command line.

Both ports pad like TensorFlow's SAME, statically for the image_size they are built with, so
each oracle is built at the resolution it is run at.
"""

import functools
import os
import subprocess
import sys

import efficientnet_lite_pytorch
import efficientnet_pytorch
import jax
import numpy as np
import pytest
import torch

from efficientnet import create_model
from efficientnet.weights import (
    WeightsMismatchError,
    from_torch,
    load_variables,
    save_variables,
)
from efficientnet.weights.__main__ import main as cli_main

RESOLUTIONS = {
    'b0': 64,
    'b1': 65,
    'b2': 64,
    'b3': 67,
    'b4': 64,
    'b5': 64,
    'b6': 65,
    'b7': 64,
    'lite0': 64,
    'lite1': 65,
    'lite2': 64,
    'lite3': 67,
    'lite4': 64,
}
TOLERANCE = 1e-4  # max |ours - torch| / max |torch|
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_oracle(variant: str, resolution: int, seed: int) -> torch.nn.Module:
    package = efficientnet_lite_pytorch if variant.startswith('lite') else efficientnet_pytorch
    torch.manual_seed(seed)
    model = package.EfficientNet.from_name(f'efficientnet-{variant}', image_size=resolution)
    randomise(model, seed)
    return model.eval()


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics (fresh ones are 0 / 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))


def torch_logits(model: torch.nn.Module, images_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2))).numpy()


@functools.lru_cache
def jitted_apply(name: str, num_classes: int = 1000, depthwise_impl: str = 'xla'):
    # XLA's depthwise compiles faster than the unrolled CPU default; the two agree
    # (tests/test_model.py).
    model = create_model(name, num_classes=num_classes, depthwise_impl=depthwise_impl)
    return jax.jit(model.apply)


def our_logits(name: str, variables, images: np.ndarray, **kwargs) -> np.ndarray:
    return np.asarray(jitted_apply(name, **kwargs)(variables, images))


def relative_difference(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def random_images(resolution: int, seed: int, batch: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 1.0, (batch, resolution, resolution, 3)).astype(np.float32)


@pytest.mark.parametrize('variant', list(RESOLUTIONS))
def test_logits_match_pytorch_ports(variant):
    res = RESOLUTIONS[variant]
    seed = int(variant[-1]) + (10 if variant.startswith('lite') else 0)
    oracle = torch_oracle(variant, res, seed)
    images = random_images(res, seed)
    reference = torch_logits(oracle, images)
    variables = from_torch(oracle.state_dict(), variant)
    ours = our_logits(variant, variables, images)
    diff = relative_difference(ours, reference)
    print(f'torch {variant} @ {res}px: max relative logit difference {diff:.2e}')
    assert diff < TOLERANCE


@pytest.fixture(scope='module')
def b0():
    return torch_oracle('b0', 64, seed=20)


def test_pth_files_and_wrapped_state_dicts(b0, tmp_path):
    images = random_images(64, seed=21)
    reference = torch_logits(b0, images)
    path = tmp_path / 'b0.pth'
    # DataParallel prefixes and a {'state_dict': ...} wrapper, as training scripts save them.
    wrapped = {'state_dict': {'module.' + k: v for k, v in b0.state_dict().items()}, 'epoch': 3}
    torch.save(wrapped, path)
    variables = from_torch(path, 'efficientnet-b0')
    assert relative_difference(our_logits('b0', variables, images), reference) < TOLERANCE


def test_skip_head_matches_pooled_features(b0):
    images = random_images(64, seed=22)
    with torch.no_grad():
        features = b0.extract_features(torch.from_numpy(images.transpose(0, 3, 1, 2)))
        reference = features.mean(dim=(2, 3)).numpy()
    state = {k: v for k, v in b0.state_dict().items() if not k.startswith('_fc.')}
    with pytest.raises(WeightsMismatchError, match='skip_head=True'):
        from_torch(state, 'b0')
    for source in (state, b0.state_dict()):  # with or without the head in the source
        variables = from_torch(source, 'b0', skip_head=True)
        assert 'classifier' not in variables['params']
        ours = our_logits('b0', variables, images, num_classes=0)
        assert relative_difference(ours, reference) < TOLERANCE


def test_mismatches_name_the_offenders(b0):
    state = dict(b0.state_dict())
    missing = dict(state)
    del missing['_blocks.3._bn1.running_var']
    with pytest.raises(
        WeightsMismatchError,
        match=r'1 missing: blocks_3/dw_bn/var \(needs _blocks.3._bn1.running_var\)',
    ):
        from_torch(missing, 'b0')
    extra = dict(state, **{'_blocks.3._extra.weight': torch.zeros(3)})
    with pytest.raises(WeightsMismatchError, match=r'1 unexpected: _blocks.3._extra.weight$'):
        from_torch(extra, 'b0')
    misshapen = dict(state, **{'_blocks.2._se_reduce.bias': torch.zeros(5)})
    with pytest.raises(
        WeightsMismatchError,
        match=r'1 shape mismatches: blocks_2/se/reduce/bias expects 6 but '
        r'_blocks.2._se_reduce.bias gives 5',
    ):
        from_torch(misshapen, 'b0')
    with pytest.raises(WeightsMismatchError, match='classifier/kernel expects 1280x10'):
        from_torch(state, 'b0', num_classes=10)
    # B0 weights as B1: B1 has seven more blocks and a different block 1.
    with pytest.raises(
        WeightsMismatchError,
        match=r'as efficientnet-b1: 133 missing: blocks_16/.*'
        r'5 unexpected: _blocks.1._bn0.bias, .*'
        r'262 shape mismatches: blocks_1/dw_bn/bias expects 16 but '
        r'_blocks.1._bn1.bias gives 96',
    ):
        from_torch(state, 'b1')
    with pytest.raises(ValueError, match='unknown EfficientNet variant'):
        from_torch(state, 'b9')
    with pytest.raises(FileNotFoundError, match='not found'):
        from_torch('/nonexistent/b0.pth', 'b0')
    with pytest.raises(ValueError, match='state dict'):
        from_torch([1, 2], 'b0')


def test_save_load_round_trip(b0, tmp_path):
    variables = from_torch(b0.state_dict(), 'b0')
    path = tmp_path / 'b0.msgpack'
    save_variables(path, variables, 'b0')
    assert os.listdir(tmp_path) == ['b0.msgpack']  # the temporary file was renamed away
    name, loaded = load_variables(path)
    assert name == 'efficientnet-b0'
    assert jax.tree.structure(loaded) == jax.tree.structure(variables)
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(loaded))
    images = random_images(64, seed=23)
    ours = our_logits(name, loaded, images)
    assert relative_difference(ours, torch_logits(b0, images)) < TOLERANCE
    (tmp_path / 'junk.msgpack').write_bytes(b'\x01\x02 not msgpack')
    with pytest.raises(ValueError, match='not an efficientnet weights file'):
        load_variables(tmp_path / 'junk.msgpack')
    with pytest.raises(FileNotFoundError):
        load_variables(tmp_path / 'absent.msgpack')


def test_command_line(b0, tmp_path, capsys):
    source = tmp_path / 'b0.pth'
    torch.save(b0.state_dict(), source)
    output = tmp_path / 'b0.msgpack'
    result = subprocess.run(
        [
            sys.executable,
            '-m',
            'efficientnet.weights',
            '--source',
            'torch',
            '--model',
            'b0',
            str(source),
            str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS='cpu'),
    )
    assert result.returncode == 0, result.stderr
    tensors = sum(not k.endswith('num_batches_tracked') for k in b0.state_dict())
    assert f'converted {tensors} tensors' in result.stdout
    assert '5,288,548 parameters' in result.stdout  # docs/reference.md §1
    name, variables = load_variables(output)
    assert name == 'efficientnet-b0'
    images = random_images(64, seed=24)
    ours = our_logits(name, variables, images)
    assert relative_difference(ours, torch_logits(b0, images)) < TOLERANCE

    # Error paths, in-process: a clear message on stderr and exit status 1.
    assert (
        cli_main(
            [
                '--source',
                'torch',
                '--model',
                'b0',
                str(tmp_path / 'nope.pth'),
                str(tmp_path / 'x.msgpack'),
            ]
        )
        == 1
    )
    assert 'input not found' in capsys.readouterr().err
    assert (
        cli_main(['--source', 'torch', '--model', 'b2', str(source), str(tmp_path / 'x.msgpack')])
        == 1
    )
    err = capsys.readouterr().err
    assert 'do not fit as efficientnet-b2' in err and 'shape mismatches' in err
    assert (
        cli_main(['--source', 'torch', '--model', 'b99', str(source), str(tmp_path / 'x.msgpack')])
        == 1
    )
    assert 'unknown EfficientNet variant' in capsys.readouterr().err
    assert not (tmp_path / 'x.msgpack').exists()
