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
    # Small images (Fashion-MNIST, CIFAR): shift by up to this many pixels each way after the
    # resize, zeros filling the border (0: off; input_pipeline/preprocessing.py, translate).
    d.random_translate = 0
    d.augment = 'none'  # none, randaugment, autoaugment
    d.randaugment_layers = 2
    d.randaugment_magnitude = 9
    d.mixup_alpha = 0.0
    d.cutmix_alpha = 0.0
    # MixUp/CutMix partner rows within fixed groups of this many consecutive rows of the global
    # batch (one CutMix box per group), so mixing does not depend on the process count; it must
    # divide the per-process batch.
    d.mix_group_size = 2
    # imagenet, advprop or lite, applied on the device; None: the variant's own
    # (Variant.normalization: lite for Lite, imagenet for the others)
    d.normalization = ml_collections.FieldReference(None, field_type=str)
    d.cache = False
    # Distillation with config.distill.teacher_input = 'clean': each training example also
    # yields 'teacher_image', an eval centre crop at this resolution (None: no such image).
    d.teacher_resolution = ml_collections.FieldReference(None, field_type=int)
    d.teacher_crop_fraction = ml_collections.FieldReference(None, field_type=float)
    # Noisy Student's student (training/noisy_student.py writes these): a selection file of
    # pseudo-labels over unlabeled_split (None: off), and unlabeled_ratio pseudo-labeled rows
    # per labeled row in every batch (input_pipeline/pseudo_labels.py).
    d.pseudo_labels = ml_collections.FieldReference(None, field_type=str)
    d.unlabeled_split = ml_collections.FieldReference(None, field_type=str)
    d.unlabeled_ratio = 1
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
    # Compute each stage's repeated blocks with one scan (jax.lax.scan over their stacked
    # variables): XLA compiles one block per stage, so compile time no longer grows with depth.
    # The same variables, checkpoints and results within float32 rounding (docs/benchmarks.md).
    # None: on for GPU and TPU, off on CPU (XLA:CPU runs the scanned step 1.2-6x slower).
    config.model.scan_blocks = ml_collections.FieldReference(None, field_type=bool)

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
    # last step. keep_prob 1.0: off. scale_by_stage: the official ResNet rule, keep_prob on
    # the network's last stage and a quarter of the drop rate per stage before it; False: the
    # same keep_prob on every chosen stage.
    config.dropblock = ml_collections.ConfigDict()
    config.dropblock.keep_prob = 1.0
    config.dropblock.block_size = 7
    config.dropblock.stages = (-2, -1)
    config.dropblock.scale_by_stage = True
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
    # Quantisation-aware training to an int8 TFLite model (scripts/qat.py, training/qat.py): a
    # fine-tune of the BatchNorm-folded network of the trained workdir init_from (None: off)
    # with fake-quant, on the training split of that workdir's config.data (this config's data
    # section is not used). Adam with a cosine decay from learning_rate over steps.
    config.qat = ml_collections.ConfigDict()
    config.qat.init_from = ml_collections.FieldReference(None, field_type=str)
    config.qat.use_ema = True  # start from the EMA weights (what evaluation and export use)
    config.qat.steps = 500
    config.qat.batch_size = 128
    config.qat.learning_rate = 1e-4
    config.qat.range_decay = 0.99  # EMA of each activation's batch min/max
    config.qat.label_smoothing = 0.1
    config.qat.seed = 0
    # At the end: top-1 of the float model, post-training int8 (calibrated on num_calibration
    # training images), the QAT model in JAX and its int8 TFLite file on the eval split.
    config.qat.evaluate = True
    config.qat.num_calibration = 200

    # Noisy Student's driver (scripts/noisy_student.py; train.py reads only the
    # config.data.pseudo_labels fields it sets for a student run).
    config.noisy_student = get_noisy_student_config()

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
    config.progressive = get_progressive_config()
    return config


def get_noisy_student_config() -> ml_collections.ConfigDict:
    """``config.noisy_student``: the iterations of Noisy Student (docs/techniques.md).

    Iteration 0 trains the teacher with the config as it is, on ``labeled_split``. Each
    iteration k >= 1 predicts ``unlabeled_split`` with the latest teacher (evaluation mode, its
    own eval preprocessing), keeps the images the official filter keeps, and trains a student
    on the labeled split plus those pseudo-labels, with the ``noise`` overrides and its entry
    of ``students``; the student is the next iteration's teacher.
    """
    ns = ml_collections.ConfigDict()
    ns.iterations = 1  # students trained after the first teacher
    ns.labeled_split = 'train'
    ns.unlabeled_split = ml_collections.FieldReference(None, field_type=str)
    # Pseudo-labels: softmax(teacher logits / temperature) (soft; the official recipe, T = 1),
    # or the teacher's class with label smoothing (hard_labels).
    ns.temperature = 1.0
    ns.hard_labels = False
    # The official filter (training/noisy_student.py): confidence >= min_threshold, then
    # images_per_class per class by down-sampling or duplicating (ImageNet: 0.3 and 130000);
    # 0: every image above the threshold once.
    ns.min_threshold = 0.3
    ns.images_per_class = 0
    ns.unlabeled_ratio = 3  # pseudo-labeled rows per labeled row in a batch (official: 1-3, 14, 28)
    # train.py overrides ('key=value ...') for every student: its noise (RandAugment, dropout,
    # stochastic depth); the teacher is never noised when it predicts.
    ns.noise = ''
    # Per iteration (or one entry for all): the student's own overrides, e.g. its size
    # ('model.width=0.75 model.depth=0.75'); a student must be at least as wide and deep as its
    # teacher.
    ns.students = ()
    ns.predict_batch_size = 256
    return ns


def get_progressive_config() -> ml_collections.ConfigDict:
    """``config.progressive``: EfficientNetV2's progressive learning as data (docs/models.md).

    Training is split into ``stages`` equal parts; stage k trains at its own image size,
    RandAugment magnitude, MixUp and CutMix alpha and dropout rate, interpolated between the
    min_* and max_* values by ``rule`` (``training/progressive.py`` derives each stage's values;
    a None bound means the constant setting of config.data / config.model). ``stages = 1``
    (the default) is no progression: one stage at the final values (at ``max_resolution`` when
    it is set, else at data.resolution). Evaluation stays at ``data.resolution``. train.py
    compiles each stage's step once and resumes inside a stage exactly.
    """
    p = ml_collections.ConfigDict()
    p.stages = 1
    # 'official' (google/automl efficientnetv2 main.py / main_tf2.py): stage k of M trains at
    # size min + (max - min) * (k + 1) / M, so the first stage is above the minimum, while the
    # regularisers follow linspace(min, max, M). 'paper' (Algorithm 1): every value, the size
    # included, follows linspace(min, max, M).
    p.rule = 'official'
    p.min_resolution = 128
    p.max_resolution = ml_collections.FieldReference(None, field_type=int)
    p.min_randaugment_magnitude = ml_collections.FieldReference(None, field_type=float)
    p.max_randaugment_magnitude = ml_collections.FieldReference(None, field_type=float)
    p.min_mixup_alpha = ml_collections.FieldReference(None, field_type=float)
    p.max_mixup_alpha = ml_collections.FieldReference(None, field_type=float)
    p.min_cutmix_alpha = ml_collections.FieldReference(None, field_type=float)
    p.max_cutmix_alpha = ml_collections.FieldReference(None, field_type=float)
    p.min_dropout = ml_collections.FieldReference(None, field_type=float)
    p.max_dropout = ml_collections.FieldReference(None, field_type=float)
    return p


def variant_config(
    name: str, *, augment: str, randaugment_magnitude: int | None = None
) -> ml_collections.ConfigDict:
    """The official ImageNet recipe for one variant (``configs/b0.py`` ... ``b7.py``,
    ``configs/v2_*.py`` through ``v2_variant_config``).

    The variant's native resolution and dropout rate come from ``efficientnet.arch`` (as does
    the stochastic-depth rate, the family's and already the default), and so does its eval
    preprocessing (interpolation; crop fraction where it is not S / (S + 32)); the caller states
    only the augmentation the published recipe chose for it: ``'autoaugment'``, or
    ``'randaugment'`` with its magnitude (``randaugment_magnitude``; None keeps the default).
    """
    variant = arch.get_variant(name)
    config = get_config()
    apply_variant_preprocessing(config, variant.name)
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


def apply_variant_preprocessing(config: ml_collections.ConfigDict, name: str) -> None:
    """The eval preprocessing the variant's published weights expect: its interpolation, and
    its crop fraction when that is not the default S / (S + 32) (V2-S/M/L/XL: no crop). The
    input normalisation is already the variant's (``data.normalization`` None)."""
    variant = arch.get_variant(name)
    config.data.interpolation = variant.interpolation
    default_crop = variant.resolution / (variant.resolution + arch.CROP_PADDING)
    if variant.crop_fraction != default_crop:
        config.data.crop_fraction = variant.crop_fraction


# The first stage's values of the official progressive learning (google/automl efficientnetv2
# hparams.py and main_tf2.py): 4 stages from 128 px, RandAugment magnitude 5 and no MixUp or
# CutMix, growing to the variant's final values.
V2_STAGES = 4
V2_MIN_RESOLUTION = 128
V2_MIN_RANDAUGMENT_MAGNITUDE = 5.0


def v2_variant_config(
    name: str,
    *,
    augment: str,
    randaugment_magnitude: float | None = None,
    mixup_alpha: float = 0.0,
) -> ml_collections.ConfigDict:
    """The official ImageNet recipe for one EfficientNetV2 (``configs/v2_b0.py`` ...
    ``v2_xl.py``), with the official code's progressive-learning schedule in
    ``config.progressive``.

    The caller states the recipe's choices for the variant: ``augment`` ('autoaugment' for
    V2-B0..B3, which keep V1's preprocessing; 'randaugment' for S/M/L/XL), the final RandAugment
    magnitude and the final MixUp alpha (CutMix takes the same alpha, as in the official code,
    which gives half the batch each when both are on). Sizes, dropout and the eval
    preprocessing come from ``efficientnet.arch``.

    ``config.data`` holds the final values (RandAugment magnitude, MixUp/CutMix alpha) and
    the eval size; the stages train at the sizes and strengths ``config.progressive`` derives.
    """
    variant = arch.get_variant(name)
    config = variant_config(name, augment=augment)
    if randaugment_magnitude is not None:
        # data.randaugment_magnitude is an int; the fractional stage values live in progressive.
        config.data.randaugment_magnitude = int(round(randaugment_magnitude))
    config.data.mixup_alpha = mixup_alpha
    config.data.cutmix_alpha = mixup_alpha
    p = config.progressive
    p.stages = V2_STAGES
    p.rule = 'official'
    p.min_resolution = V2_MIN_RESOLUTION
    p.max_resolution = variant.train_resolution or variant.resolution
    if augment == 'randaugment':
        p.min_randaugment_magnitude = V2_MIN_RANDAUGMENT_MAGNITUDE
        p.max_randaugment_magnitude = float(randaugment_magnitude)
    p.min_mixup_alpha = p.min_cutmix_alpha = 0.0
    p.max_mixup_alpha = p.max_cutmix_alpha = float(mixup_alpha)
    # The official code builds a dropout schedule and then discards it: dropout stays at the
    # variant's rate in every stage.
    p.min_dropout = p.max_dropout = variant.dropout
    return config
