"""Knowledge distillation on Fashion-MNIST: a narrow student (width = depth = 0.25) learns from
a trained teacher (any workdir or weights file ``load_model`` reads) as well as from the labels
(docs/techniques.md).

    python train.py --config=configs/quickstart.py --workdir=/tmp/fmnist_teacher \
        --config.data.resolution=32 --config.num_epochs=15
    python train.py --config=configs/distill.py --workdir=/tmp/fmnist_student \
        --config.distill.teacher=/tmp/fmnist_teacher
"""

from configs import quickstart


def get_config():
    config = quickstart.small_config()
    config.model.width = 0.25
    config.model.depth = 0.25
    config.distill.teacher = '/tmp/fmnist_teacher'
    config.distill.temperature = 2.0
    config.distill.alpha = 0.5
    config.distill.teacher_input = 'student'  # the student's (flipped) image
    return config
