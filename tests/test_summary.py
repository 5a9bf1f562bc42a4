"""efficientnet/summary.py: multiply-add counts against an independent count over
efficientnet_pytorch and against the paper's figures, and the command line."""

import subprocess
import sys

import pytest

from efficientnet import arch

PAPER_FLOPS_B = {
    'b0': 0.39,
    'b1': 0.70,
    'b2': 1.0,
    'b3': 1.8,
    'b4': 4.2,
    'b5': 9.9,
    'b6': 19,
    'b7': 37,
}


def _torch_macs(name, res):
    """Multiply-adds of efficientnet_pytorch's network, counted by forward hooks on meta tensors."""
    torch = pytest.importorskip('torch')
    from efficientnet_pytorch import EfficientNet

    with torch.device('meta'):
        net = EfficientNet.from_name(f'efficientnet-{name}').eval()
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            total[0] += out.numel() * mod.in_channels // mod.groups * k
        elif isinstance(mod, torch.nn.Linear):
            total[0] += out.numel() * mod.in_features

    for m in net.modules():
        m.register_forward_hook(hook)
    with torch.no_grad():
        net(torch.zeros(1, 3, res, res, device='meta'))
    return total[0]


@pytest.mark.parametrize('name', list(PAPER_FLOPS_B))
def test_flops(name):
    from efficientnet.summary import count_flops

    res = arch.get_variant(name).resolution
    ours = count_flops(name)
    # An independent count over an independent implementation agrees to the multiply-add.
    assert ours == _torch_macs(name, res)
    rel = ours / (PAPER_FLOPS_B[name] * 1e9) - 1
    if name in ('b4', 'b5'):
        # The paper's 4.2B and 9.9B sit below what the published B4/B5 networks compute at 380
        # and 456 px (4.39B and 10.27B, confirmed above by efficientnet_pytorch; thop and other
        # counters report the same gap). We reproduce the networks, so these two are 3.7-4.6%
        # above the paper's rounded figures.
        assert 0.03 < rel < 0.05
    else:
        assert abs(rel) < 0.03


def test_summary_json_cli():
    import json

    out = subprocess.run(
        [sys.executable, '-m', 'efficientnet.summary', '--json', '--models', 'b0', 'lite0'],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(out.stdout)
    assert rows['efficientnet-b0']['params'] == 5_288_548
    assert rows['efficientnet-b0']['resolution'] == 224
    assert abs(rows['efficientnet-b0']['flops'] - 0.386e9) < 1e6
    bad = subprocess.run(
        [sys.executable, '-m', 'efficientnet.summary', '--models', 'b9'],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and 'unknown EfficientNet variant' in bad.stderr
