"""Knowledge distillation: a frozen teacher inside the jitted train step.

Loss per example (Hinton et al. 2015)::

    (1 - alpha) * CE(labels, student)  +  alpha * T**2 * KL(softmax(t / T) || softmax(s / T))

``t`` and ``s`` are the teacher's and the student's float32 logits. The T**2 factor keeps the
soft term's gradients the same size whatever T; at T = 1 the soft term is the Noisy Student
code's cross-entropy against the teacher's probabilities minus the teacher's entropy (a
constant), so the gradients are the same. ``alpha = 1`` trains on the teacher alone.

The teacher is anything ``inference.loading.load_model`` reads (a workdir, msgpack, Keras,
PyTorch or TF weights), of any variant and resolution. It runs in eval mode (moving BatchNorm
statistics, no dropout), under ``stop_gradient``, with its own input normalisation, and its
variables are an argument of the jitted step sharded by the same rules as the student's
parameters; they are not in the train state, so the optimizer never sees them and checkpoints
do not grow (a resumed run loads the teacher again from the same source).

What the teacher sees (``config.distill.teacher_input``):

- ``'student'``: the student's augmented (and mixed) image, resized on the device to the
  teacher's resolution (bilinear) when the two differ ("consistent" teaching, Beyer et al.);
- ``'clean'``: an eval centre crop of the same example at ``config.data.teacher_resolution``
  (crop fraction ``config.data.teacher_crop_fraction``), made by the input pipeline
  (``batch['teacher_image']``), as Noisy Student's un-noised teacher.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from efficientnet.normalization import normalize_images
from training.losses import cross_entropy

TEACHER_INPUTS = ('student', 'clean')


def soft_cross_entropy(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """Per-example ``T**2 * KL(softmax(t / T) || softmax(s / T))`` in float32."""
    t = teacher_logits.astype(jnp.float32) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    p = jax.nn.softmax(t, axis=-1)
    kl = jnp.sum(p * (jax.nn.log_softmax(t, axis=-1) - jax.nn.log_softmax(s, axis=-1)), axis=-1)
    return (temperature**2) * kl


def distill_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Per-example ``(1 - alpha) * CE(labels) + alpha * T**2 * KL`` (module docstring)."""
    soft = soft_cross_entropy(student_logits, teacher_logits, temperature)
    if alpha == 1.0:
        return soft
    hard = cross_entropy(student_logits, labels, label_smoothing)
    return (1.0 - alpha) * hard + alpha * soft


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen teacher: its module (float32, eval mode), how it wants its input, and the
    distillation settings. Its variables travel separately (an argument of the step)."""

    model: Any
    resolution: int
    normalization: str
    temperature: float
    alpha: float
    teacher_input: str

    def logits(self, variables: Any, batch: dict) -> jax.Array:
        """The teacher's float32 logits for ``batch`` (gradients stopped)."""
        if self.teacher_input == 'clean':
            images = batch['teacher_image']
        else:
            images = batch['image'].astype(jnp.float32)
            n, h, w, c = images.shape
            if (h, w) != (self.resolution, self.resolution):
                images = jax.image.resize(
                    images, (n, self.resolution, self.resolution, c), 'bilinear'
                )
        x = normalize_images(images, self.normalization, jnp.float32)  # the teacher runs float32
        variables = jax.lax.stop_gradient(variables)
        logits = self.model.apply(variables, x, train=False)
        return jax.lax.stop_gradient(logits.astype(jnp.float32))

    def loss(self, student_logits, teacher_logits, labels, label_smoothing) -> jax.Array:
        return distill_loss(
            student_logits,
            teacher_logits,
            labels,
            temperature=self.temperature,
            alpha=self.alpha,
            label_smoothing=label_smoothing,
        )


def config_problems(config: Any, num_classes: int | None = None) -> list[str]:
    """What is wrong with ``config.distill`` (one line each, naming the fix); cheap checks
    only (the teacher file itself is read by ``load_teacher``)."""
    d = config.get('distill')
    if d is None or not d.teacher:
        return []
    errors = []
    if not d.temperature > 0:
        errors.append(f'config.distill.temperature must be > 0, got {d.temperature}')
    if not 0.0 <= d.alpha <= 1.0:
        errors.append(
            f'config.distill.alpha (the teacher term weight) must be in [0, 1], got {d.alpha}'
        )
    if d.teacher_input == 'clean' and not config.data.get('teacher_resolution'):
        errors.append(
            "config.distill.teacher_input='clean' needs config.data.teacher_resolution (the "
            "teacher's resolution, e.g. its native one)"
        )
    if d.teacher_input not in TEACHER_INPUTS:
        errors.append(
            f'config.distill.teacher_input must be one of {TEACHER_INPUTS}, got {d.teacher_input!r}'
        )
    return errors


def load_teacher(config: Any, num_classes: int) -> tuple[Teacher, Any] | None:
    """``config.distill`` -> (Teacher, numpy variables), or None when distillation is off.

    Raises ValueError naming the problem (wrong class count, unreadable weights) before any
    compilation."""
    d = config.get('distill')
    if d is None or not d.teacher:
        return None
    # The teacher is a trained model being used: read through the one loader of the
    # inference package (imported here only, so runs without a teacher never import it).
    from inference.loading import load_model

    loaded = load_model(d.teacher, model=d.teacher_model or None)
    if loaded.num_classes != num_classes:
        raise ValueError(
            f'config.distill.teacher={d.teacher!r} has {loaded.num_classes} classes but the '
            f'student has {num_classes}; distil from a teacher trained on the same classes'
        )
    # The pipeline's teacher_image size ('clean'), or what the student's image is resized to
    # ('student'; default: the teacher's own resolution).
    resolution = config.data.get('teacher_resolution') or loaded.resolution
    teacher = Teacher(
        model=loaded.model,
        resolution=int(resolution),
        normalization=loaded.normalization,
        temperature=float(d.temperature),
        alpha=float(d.alpha),
        teacher_input=d.teacher_input,
    )
    return teacher, loaded.variables
