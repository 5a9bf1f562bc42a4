"""Noisy Student on Fashion-MNIST: 10% of the train split labeled, the other 90% unlabeled
(their labels are never read), the quickstart's model and recipe.

    python scripts/noisy_student.py --config=configs/noisy_student.py --workdir=/tmp/ns

The teacher trains on the 6,000 labeled images; each student on them plus the teacher's soft
pseudo-labels of the 54,000 others, three pseudo-labeled rows per labeled row, noised with
RandAugment, dropout and stochastic depth (docs/techniques.md has the results).
"""

from configs import quickstart


def get_config():
    config = quickstart.get_config()
    config.data.train_split = 'train[:10%]'  # the driver sets it from noisy_student.labeled_split
    config.num_epochs = 30.0  # 46 steps per epoch on the labeled split: 1,380 steps
    config.eval_every_epochs = 10.0
    config.checkpoint.every_steps = 500
    ns = config.noisy_student
    ns.iterations = 2
    ns.labeled_split = 'train[:10%]'
    ns.unlabeled_split = 'train[10%:]'
    ns.temperature = 1.0
    ns.min_threshold = 0.3
    ns.images_per_class = 0  # keep every confident image once (no balancing)
    ns.unlabeled_ratio = 3
    # A student trains on 6,000 + ~54,000 examples per epoch (~470 steps of 32 + 96 rows).
    # Light noise: this narrow net at 32 px underfits, and RandAugment (M = 5) with dropout and
    # stochastic depth 0.2 left the first student at 80.0%, below its teacher (docs).
    ns.noise = 'num_epochs=5 eval_every_epochs=5 model.dropout_rate=0.1 model.drop_path_rate=0.1'
    return config
