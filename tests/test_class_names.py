"""inference.class_names: the names a loaded model's classes get (the workdir case, a real
image folder's subfolders, is in test_loading.py)."""

from __future__ import annotations

from inference.class_names import class_names
from inference.loaded_model import LoadedModel


def test_class_names_for_datasets():
    base = dict(
        name='',
        model=None,
        variables={},
        resolution=32,
        crop_fraction=None,
        normalization='imagenet',
        interpolation='bicubic',
    )
    imagenet = class_names(LoadedModel(num_classes=1000, **base))
    assert imagenet[0] == 'tench' and len(imagenet) == 1000
    fmnist = LoadedModel(num_classes=10, data_config={'name': 'fashion_mnist'}, **base)
    assert class_names(fmnist)[9] == 'Ankle boot'
    fake = LoadedModel(num_classes=4, data_config={'name': 'fake'}, **base)
    assert class_names(fake) == ['class_0', 'class_1', 'class_2', 'class_3']
    gone = LoadedModel(num_classes=2, data_config={'name': 'folder', 'folder': '/none'}, **base)
    assert class_names(gone) == ['class_0', 'class_1']
