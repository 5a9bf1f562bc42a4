"""EfficientNetV2 through what a trained model is used for: load_model (msgpack, and a timm
.safetensors file with the V2-S eval preprocessing), predict, ONNX and TFLite export (checked
by running the exported file with onnxruntime and the TFLite interpreter against the JAX
model), and fine-tuning's init_from merge. A tiny V2 (the base table at width 0.25, depth 0.5,
32 px) has all three block kinds: Fused-MBConv without expansion (8 -> 8, with its skip), with
expansion, and MBConv.
"""

import json

import numpy as np
import pytest

import efficientnet
from efficientnet import arch
from efficientnet.weights import save_variables
from inference import export as ex
from inference.loading import load_model
from scripts import predict as predict_script
from tests import input_fixtures as fx
from tests.inference_fixtures import random_variables
from tests.test_export import assert_float_parity, reference_logits

TINY = 'efficientnetv2-tiny'
CLASSES = 10
RES = 32


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    variables = random_variables(TINY, CLASSES, seed=3)
    path = str(tmp_path_factory.mktemp('v2') / 'tiny.msgpack')
    save_variables(path, variables, TINY)
    images = np.random.default_rng(4).integers(0, 256, (6, RES, RES, 3), dtype=np.uint8)
    model = efficientnet.create_model(TINY, num_classes=CLASSES, depthwise_impl='xla')
    return path, variables, images, reference_logits(model, variables, images, 'imagenet')


def test_tiny_has_every_block_kind():
    blocks = arch.build_blocks(arch.get_variant(TINY))
    kinds = {(b.fused, b.expand != 1) for b in blocks}
    assert kinds == {(True, False), (True, True), (False, True)}
    assert blocks[0].fused and blocks[0].expand == 1 and blocks[0].has_residual


def test_load_model_and_export(tiny, tmp_path):
    path, _, images, reference = tiny
    loaded = load_model(path, depthwise_impl='xla')
    assert (loaded.name, loaded.num_classes, loaded.normalization) == (TINY, CLASSES, 'imagenet')
    np.testing.assert_allclose(loaded.logits(images), reference, rtol=1e-5, atol=1e-5)
    onnx_path = ex.export_onnx(loaded.model, loaded.variables, tmp_path / 'v2.onnx')
    assert_float_parity(ex.run_onnx(onnx_path, images), reference, 'onnx efficientnetv2-tiny')
    data = ex.convert_tflite(loaded.model, loaded.variables)
    assert_float_parity(ex.run_tflite(data, images), reference, 'tflite efficientnetv2-tiny')


def test_predict_script(tiny, tmp_path, capsys):
    path = tiny[0]
    image = tmp_path / 'colour.jpg'
    image.write_bytes(fx.encode(fx.color_image(3, 48, 40), quality=95))
    rc = predict_script.main(
        [str(image), '--weights', path, '--json', '--top', '3', '--depthwise-impl', 'xla']
    )
    assert rc == 0
    (result,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert result['image'] == str(image) and len(result['top']) == 3
    assert all(0 <= t['label'] < CLASSES for t in result['top'])


def test_load_model_of_timm_weights_takes_the_v2_eval_preprocessing(tmp_path):
    import torch
    from safetensors.torch import save_file

    from scripts.timm_import import import_timm

    torch.manual_seed(0)
    net = import_timm().create_model('tf_efficientnetv2_s', pretrained=False)
    file = tmp_path / 'model.safetensors'
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(file))
    loaded = load_model(str(file), model='v2-s')
    assert (loaded.name, loaded.format, loaded.num_classes) == ('efficientnetv2-s', 'torch', 1000)
    assert (loaded.resolution, loaded.effective_crop_fraction) == (384, 1.0)
    assert (loaded.normalization, loaded.interpolation) == ('v2', 'bilinear')
    np.testing.assert_array_equal(
        loaded.variables['params']['blocks_0']['project_conv']['kernel'],
        net.state_dict()['blocks.0.0.conv.weight'].numpy().transpose(2, 3, 1, 0),
    )
    with pytest.raises(ValueError, match='do not fit as efficientnetv2-b0: 311 unexpected'):
        load_model(str(file), model='v2-b0')


def test_finetune_takes_v2_weights_but_the_classifier(tmp_path):
    """configs/v2_finetune.py at tiny width/depth: weights of the same network with another
    class count merge into the fresh state except the classifier (train.py's init_from)."""
    import jax
    import jax.numpy as jnp

    from tests.test_configs import load
    from training import checkpoint as ckpt_lib
    from training import config_resolve

    config = load(
        'v2_finetune.py',
        '--config.data.folder=/unused',
        '--config.model.width=0.25',
        '--config.model.depth=0.25',
    )
    model = config_resolve.build_model(config, 5)
    assert model.variant.is_v2 and model.variant.normalization == 'v2'
    fresh = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, RES, RES, 3)))
    other = config_resolve.build_model(config, 1000)
    pre = jax.eval_shape(other.init, jax.random.key(0), jnp.zeros((1, RES, RES, 3)))
    pre = jax.tree.map(lambda s: np.ones(s.shape, np.float32), pre)
    file = str(tmp_path / 'pre.msgpack')
    save_variables(file, pre, 'v2-s')
    loaded = ckpt_lib.load_pretrained(file)
    params, reinit = ckpt_lib.merge_pretrained(fresh['params'], loaded['params'])
    assert reinit == ["['classifier']['bias']", "['classifier']['kernel']"]
    np.testing.assert_array_equal(params['blocks_0']['project_conv']['kernel'], 1.0)
