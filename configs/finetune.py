"""Fine-tunes a pretrained EfficientNet on an image folder (root/<class>/<image>).

    python train.py --config=configs/finetune.py --workdir=/ckpt/flowers \
        --config.init_from=b0.msgpack --config.data.folder=/data/flowers

``init_from`` is converted published weights (``python -m efficientnet.weights ...``) or a
workdir of ours; the classifier is re-initialised because its class count differs (train.py
logs what it re-initialised: only ``classifier`` should be listed). Set ``model.name`` and
``data.resolution`` to the pretrained variant (``--config.model.name=efficientnet-b3
--config.data.resolution=300``); weights of another model stop the run with an error, since
only the classifier may differ. ``data.num_classes`` is left unset: the folder's class count is
used (set it to have the run check the count). The held-out split is
``data.holdout_fraction`` of each class (chosen by a hash of the file path, so it is stable),
and the last line train.py prints is the held-out top-1.

The schedule is a transfer schedule, not the 350-epoch ImageNet recipe:

- 10 epochs: pretrained features need few passes; small folders overfit with more.
- SGD with Nesterov momentum 0.9 at 0.01 per 256 images (0.0025 at batch 64), cosine to zero,
  as in transfer studies (Kornblith et al. 2019, BiT): RMSProp's per-weight scaling and a large
  rate would move the pretrained weights far from where they transfer well.
- Half an epoch of linear warmup, so the large gradients of the fresh classifier do not wreck
  the pretrained features in the first steps.
- Lighter regularisation: no RandAugment or MixUp, stochastic depth 0.1 (0.2 in pretraining),
  the variant's dropout, label smoothing 0.1 and L2 1e-5 as in pretraining.
- EMA decay 0.99 (the pretraining 0.9999 averages over 10k steps, longer than the whole run).
- Evaluation every epoch, so WORKDIR/best holds the best held-out checkpoint.

On a CPU add ``--config.model.compute_dtype=float32`` (bfloat16 is slow there).
"""

import ml_collections

from configs import base


def get_config():
    config = base.get_config()
    config.model.name = 'efficientnet-b0'
    # Lighter regularisation than pretraining, and an EMA over this short run (see above).
    config.model.drop_path_rate = 0.1
    config.ema_decay = 0.99
    config.data.name = 'folder'
    config.data.folder = None  # required: --config.data.folder=DIR
    config.data.holdout_fraction = 0.2  # a larger held-out part than 0.1: small folders
    # None: the number of class folders (set it to make resolution check the count).
    config.data.num_classes = ml_collections.FieldReference(None, field_type=int)
    config.batch_size = 64
    config.num_epochs = 10.0
    config.optim.name = 'momentum'
    config.optim.base_learning_rate = 0.01  # per 256 images
    config.optim.schedule = 'cosine'
    config.optim.warmup_epochs = 0.5
    config.eval_every_epochs = 1.0
    config.log_every_steps = 20
    config.checkpoint.every_steps = 500
    config.checkpoint.keep = 2
    config.init_from = None  # required: a weights file or a workdir of ours
    return config
