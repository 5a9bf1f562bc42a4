"""Human-readable names for a loaded model's classes (used by scripts/predict.py)."""

from __future__ import annotations

from efficientnet import paths
from inference.loading import LoadedModel

FASHION_MNIST_CLASSES = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
    'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot',
)  # fmt: skip


def class_names(loaded: LoadedModel) -> list[str]:
    """Names for the model's classes: the ImageNet-1k names for 1000-class weights trained on
    ImageNet (every published checkpoint), a workdir's dataset classes where they can be found
    (an image folder's sorted subfolders, Fashion-MNIST, a prepared tfds dataset's label names),
    else 'class_<i>'."""
    n = loaded.num_classes
    data = loaded.data_config or {}
    name = str(data.get('name') or 'imagenet2012')
    names: list[str] | None = None
    if name.split(':')[0] == 'imagenet2012' and n == 1000:
        from efficientnet.classes import imagenet_class_names

        names = imagenet_class_names()
    elif name == 'folder':
        root = data.get('folder')
        if root and paths.as_path(root).is_dir():  # local or gs://
            names = [n for n in paths.listdir(root) if paths.as_path(root, n).is_dir()]
    elif name.split(':')[0] == 'fashion_mnist':
        names = list(FASHION_MNIST_CLASSES)
    elif name not in ('fake',):
        names = _tfds_label_names(name, data.get('data_dir'), data.get('label_key', 'label'))
    if names is None or len(names) != n:
        return [f'class_{i}' for i in range(n)]
    return names


def _tfds_label_names(name: str, data_dir: str | None, label_key: str) -> list[str] | None:
    try:
        import tensorflow_datasets as tfds

        builder = tfds.builder(name, data_dir=data_dir)
        return list(builder.info.features[label_key].names)
    except Exception:  # noqa: BLE001 - names are a nicety; fall back to class_<i>
        return None
