"""The full config schema, with the official ImageNet recipe (docs/reference.md §4) as defaults.

Fields hold what a person chooses; derived values (learning rate, steps per epoch, warmup and
total steps) are resolved in training/config_resolve.py, so command-line overrides such as
``--config.batch_size=1024`` stay consistent.
"""

import ml_collections

from efficientnet import arch

DEFAULT_MODEL = 'efficientnet-b0'
# The TPU slice whose BatchNorm groups the b0..b7 configs reproduce: 32 TPU v3 cores, the
# slice on which the official rule gives about 1024 of the 4096 images per group (the
# published models' exact slices are not recorded; bigger variants ran on more cores, where
# the same rule gives 512 per group from 64 cores on).
REFERENCE_TPU_CORES = 32


def get_data_config() -> ml_collections.ConfigDict:
    """``config.data``, the input-pipeline contract (docs/interfaces.md)."""
    d = ml_collections.ConfigDict()
    d.name = 'imagenet2012'  # imagenet2012, any tfds name, folder, fashion_mnist, fake
    d.data_dir = ml_collections.FieldReference(None, field_type=str)
    d.manual_dir = ml_collections.FieldReference(None, field_type=str)
    d.folder = ml_collections.FieldReference(None, field_type=str)
    d.fashion_mnist_dir = '/usr/share/datasets/fashion-mnist'  # Debian's dataset-fashion-mnist
    d.holdout_fraction = 0.1
    d.image_key = 'image'
    d.label_key = 'label'
    d.train_split = 'train'
    d.eval_split = 'validation'
    d.num_classes = 1000
    d.resolution = arch.get_variant(DEFAULT_MODEL).resolution  # the default model's native size
    d.crop_fraction = ml_collections.FieldReference(None, field_type=float)  # None: S / (S + 32)
    d.interpolation = 'bicubic'
    d.random_crop = True
    d.random_flip = True
    d.augment = 'none'  # none, randaugment, autoaugment
    d.randaugment_layers = 2
    d.randaugment_magnitude = 9
    d.mixup_alpha = 0.0
    d.cutmix_alpha = 0.0
    # imagenet, advprop or lite, applied on the device; None: the variant's own
    # (Variant.normalization: lite for Lite, imagenet for the others)
    d.normalization = ml_collections.FieldReference(None, field_type=str)
    d.shuffle_buffer = 16384
    d.cache = False
    # Distillation with config.distill.teacher_input = 'clean': each training example also
    # yields 'teacher_image', an eval centre crop at this resolution (None: no such image).
    d.teacher_resolution = ml_collections.FieldReference(None, field_type=int)
    d.teacher_crop_fraction = ml_collections.FieldReference(None, field_type=float)
    d.fake_num_train = 1024
    d.fake_num_eval = 256
    return d


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict()
    config.model.name = DEFAULT_MODEL
    # Optional overrides of the variant's compound-scaling record (None: the variant's own);
    # tests and small runs use width = depth = 0.25.
    config.model.width = ml_collections.FieldReference(None, field_type=float)
    config.model.depth = ml_collections.FieldReference(None, field_type=float)
    config.model.dropout_rate = ml_collections.FieldReference(None, field_type=float)
    config.model.drop_path_rate = arch.DROP_PATH_RATE
    config.model.depthwise_impl = 'auto'  # auto, xla, unrolled (see efficientnet.layers)
    config.model.compute_dtype = 'bfloat16'  # float32 | bfloat16; params stay float32
    # BatchNorm statistics groups, in examples, so results do not depend on the device count.
    # bn_group_size: examples per group, as chosen (None: see bn_tpu_cores).
    # bn_tpu_cores: reproduce the groups the official TPU code forms on a slice of this many
    # cores at config.batch_size; the group size is derived from both in
    # training/config_resolve.py (bn_group_size) and logged. None with bn_group_size None: the
    # whole batch is one group. A bn_group_size that is set wins over bn_tpu_cores.
    config.model.bn_group_size = ml_collections.FieldReference(None, field_type=int)
    config.model.bn_tpu_cores = ml_collections.FieldReference(None, field_type=int)
    # Recompute each MBConv block's activations in the backward pass instead of keeping them:
    # the same gradients, for the large variants on accelerators (XLA:CPU compiles it to the
    # same memory; docs/benchmarks.md).
    config.model.remat = False

    config.data = get_data_config()

    config.seed = 0
    config.batch_size = 4096  # global, over all processes and devices
    config.eval_batch_size = ml_collections.FieldReference(None, field_type=int)  # None: batch
    config.num_epochs = 350.0
    config.total_steps = ml_collections.FieldReference(None, field_type=int)  # overrides epochs

    config.optim = ml_collections.ConfigDict()
    config.optim.name = 'rmsprop'  # rmsprop (TF1 semantics), momentum, adamw
    config.optim.base_learning_rate = 0.016  # per 256 examples: lr = base * batch / 256
    config.optim.schedule = 'exponential'  # exponential (staircase), cosine, constant
    config.optim.warmup_epochs = 5.0
    config.optim.decay_epochs = 2.4
    config.optim.decay_factor = 0.97
    config.optim.min_learning_rate = 0.0
    config.optim.momentum = 0.9
    config.optim.rmsprop_decay = 0.9
    config.optim.rmsprop_epsilon = 1e-3
    config.optim.weight_decay = 1e-5
    config.optim.weight_decay_mode = 'l2'  # l2 (in the loss, official) or decoupled
    config.optim.grad_clip_norm = 0.0  # 0: off
    config.optim.grad_accum_steps = 1  # >1: each step sees batch_size / k examples

    config.label_smoothing = 0.1
    config.ema_decay = 0.9999  # 0: no EMA (the EMA copy follows the weights)

    # Techniques beyond the base recipe, all off by default (docs/techniques.md).
    # float16 compute with dynamic loss scaling (training/loss_scale.py): use with
    # --config.model.compute_dtype=float16 on GPUs without bfloat16.
    config.loss_scale = ml_collections.ConfigDict()
    config.loss_scale.mode = 'none'  # none | dynamic
    config.loss_scale.initial_scale = 2.0**15
    config.loss_scale.growth_interval = 2000  # finite steps in a row before the scale doubles
    # Knowledge distillation from a frozen teacher (training/distill.py).
    config.distill = ml_collections.ConfigDict()
    config.distill.teacher = ml_collections.FieldReference(None, field_type=str)  # None: off
    config.distill.teacher_model = ml_collections.FieldReference(None, field_type=str)
    config.distill.temperature = 1.0
    config.distill.alpha = 0.5  # weight of the teacher term; 1 - alpha on the labels
    # student: the student's augmented image, resized to the teacher's resolution on the
    # device; clean: the pipeline's centre crop at config.data.teacher_resolution
    config.distill.teacher_input = 'student'
    # DropBlock (efficientnet/dropblock.py) on the block outputs of these stages (0-based,
    # negative from the end); keep_prob falls linearly from 1 at step 0 to this value at the
    # last step. keep_prob 1.0: off.
    config.dropblock = ml_collections.ConfigDict()
    config.dropblock.keep_prob = 1.0
    config.dropblock.block_size = 7
    config.dropblock.stages = (-2, -1)
    # Magnitude pruning with tfmot's PolynomialDecay schedule (training/pruning.py); steps
    # count optimizer updates.
    config.pruning = ml_collections.ConfigDict()
    config.pruning.enabled = False
    config.pruning.initial_sparsity = 0.0
    config.pruning.final_sparsity = 0.5
    config.pruning.begin_step = 0
    config.pruning.end_step = 1000
    config.pruning.power = 3.0
    config.pruning.frequency = 100

    config.mesh = ml_collections.ConfigDict()
    config.mesh.fsdp = 1  # devices per parameter shard; 1: replicate parameters
    config.mesh.fsdp_min_size = 2**14  # smaller arrays stay replicated

    config.log_every_steps = 100
    config.eval_every_epochs = 5.0  # and always at the end
    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 2000
    config.checkpoint.keep = 3
    config.checkpoint.keep_best = True  # one more checkpoint: the best EMA top-1
    config.checkpoint.async_save = True
    config.init_from = ml_collections.FieldReference(None, field_type=str)
    config.prefetch_batches = 2
    # JAX's persistent compilation cache: a rerun or resume of the same configuration loads
    # its compiled programs instead of compiling them again (most of the time to the first step
    # on CPU; docs/benchmarks.md). 'auto': $JAX_COMPILATION_CACHE_DIR if set, else
    # ~/.cache/efficientnet_jax/xla; '': off; else a directory (see training/compilation.py).
    config.compilation_cache_dir = 'auto'
    config.profile = ml_collections.ConfigDict()
    config.profile.start_step = -1  # >= 0: capture a trace window starting there
    config.profile.num_steps = 5
    return config


def variant_config(
    name: str, *, augment: str, randaugment_magnitude: int | None = None
) -> ml_collections.ConfigDict:
    """The official ImageNet recipe for one variant (``configs/b0.py`` ... ``b7.py``).

    The variant's native resolution and dropout rate come from ``efficientnet.arch`` (as does
    the stochastic-depth rate, the family's and already the default); the caller states only
    the augmentation the published recipe chose for it: ``'autoaugment'``, or
    ``'randaugment'`` with its magnitude (``randaugment_magnitude``; None keeps the default).
    """
    variant = arch.get_variant(name)
    config = get_config()
    config.model.name = variant.name
    # BatchNorm as the official runs: batch 4096 on a 32-core TPU v3 slice. Each core holds
    # 4096 / 32 = 128 examples; slices of more than 8 cores average the statistics over groups
    # of max(8, cores // 8) = 8 cores, so 8 x 128 = 1024 examples per group, 4 groups a step.
    # The group follows --config.batch_size as the official code would on the same slice
    # (batch 2048: 8 x 64 = 512).
    config.model.bn_tpu_cores = REFERENCE_TPU_CORES
    config.model.dropout_rate = variant.dropout
    config.data.resolution = variant.resolution
    config.data.augment = augment
    if randaugment_magnitude is not None:
        config.data.randaugment_magnitude = randaugment_magnitude
    return config
