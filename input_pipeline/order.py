"""The global training order: which example sits at each position of the stream, as a pure
function of (seed, N, position), and which positions each process reads.

    position g = step · B + row                 (B: the global batch, row < B)
    epoch e = g // N, i = g mod N
    example(g) = P_e(i)                         a permutation of [0, N) keyed by hash(seed, e)

P_e is TensorFlow's stateless `index_shuffle` (a keyed bijection of [0, N)), so every epoch
visits every example exactly once and nothing is materialised: any position costs the same,
which is what makes resuming at any step O(1). Its key is two 64-bit words, each a keyed
pseudorandom permutation of the epoch number under keys hashed from the seed, so consecutive
epochs and nearby seeds give unrelated orders (never `seed + epoch`, which makes seed s at epoch
1 replay seed s + 1 at epoch 0).

Process p of P reads rows [p·B/P, (p + 1)·B/P) of every global batch: the processes' local
batches side by side are the global batch, whatever P is. The stream state is the step plus
what the order depends on (`StreamState`); a run may resume on any process or device count.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow as tf

ORDER_VERSION = 2
_MASK64 = 2**64 - 1
_EPOCH_KEY_SALTS = (0x0E90C4A1, 0x0E90C4A2)
_EXAMPLE_SALT, _MIX_SALT = 0x5EED0002, 0x5EED0003
# Epoch numbers are permuted over [0, 2^62): index_shuffle needs no cycle-walking on a range
# whose size is a power of two.
_EPOCH_RANGE = 2**62


def mix64(*parts: int) -> int:
    """A 64-bit hash of integers (SplitMix64 steps), as a non-negative int63."""
    h = 0x9E3779B97F4A7C15
    for part in parts:
        h = (h + (int(part) & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def stream_key(seed: int, salt: int) -> tf.Tensor:
    """int64 scalar: the key of one kind of random draw (examples, mixing) for a seed."""
    return tf.constant(mix64(seed, salt), tf.int64)


def example_key(seed: int) -> tf.Tensor:
    """The key of every per-example draw (crop, flip, RandAugment): seeds are (key, g)."""
    return stream_key(seed, _EXAMPLE_SALT)


def mix_key(seed: int) -> tf.Tensor:
    """The key of MixUp/CutMix draws: seeds are (key, global step)."""
    return stream_key(seed, _MIX_SALT)


def index_shuffle(index: tf.Tensor, seeds: tf.Tensor, max_index: tf.Tensor) -> tf.Tensor:
    """Position of each `index` in the permutation of [0, max_index] keyed by its row of `seeds`
    (int64 [n, 3]): TensorFlow's stateless index shuffle (Philox rounds, cycle-walking), called
    directly because `tf.random.experimental.index_shuffle` pads a batch of [n, 2] seeds along
    the wrong axis."""
    return tf.raw_ops.RandomIndexShuffle(index=index, seed=seeds, max_index=max_index, rounds=4)


def _keyed(words: list[int], n: tf.Tensor) -> tf.Tensor:
    return tf.tile(tf.constant([words], tf.int64), [n, 1])


def epoch_seeds(seed: int, epochs: tf.Tensor) -> tf.Tensor:
    """int64 [n, 3]: the permutation key of each epoch, a keyed hash of (seed, epoch): each word
    is the epoch number under a keyed pseudorandom permutation of [0, 2^62)."""
    epochs = tf.cast(epochs, tf.int64)
    n = tf.size(epochs)
    top = tf.fill([n], tf.constant(_EPOCH_RANGE - 1, tf.int64))
    words = [
        index_shuffle(epochs, _keyed([mix64(seed, salt, k) for k in range(3)], n), top)
        for salt in _EPOCH_KEY_SALTS
    ]
    return tf.stack([words[0], words[1], tf.fill([n], tf.constant(mix64(seed), tf.int64))], -1)


def example_indices(positions: tf.Tensor, seed: int, num_examples: int) -> tf.Tensor:
    """int64 [n]: the example at each global stream position (int64 [n])."""
    positions = tf.cast(positions, tf.int64)
    n = tf.constant(num_examples, tf.int64)
    epochs, offsets = positions // n, positions % n
    if num_examples == 1:
        return tf.zeros_like(positions)
    return index_shuffle(offsets, epoch_seeds(seed, epochs), tf.fill(tf.shape(offsets), n - 1))


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f'global batch {global_batch_size} must be a positive multiple of the process count '
            f'{process_count}'
        )
    return global_batch_size // process_count


def local_positions(
    step: tf.Tensor, global_batch_size: int, process_index: int, process_count: int
) -> tf.Tensor:
    """int64 [B/P]: the global positions of process p's rows of global batch `step`."""
    local = local_batch_size(global_batch_size, process_count)
    first = tf.cast(step, tf.int64) * global_batch_size + process_index * local
    return first + tf.range(local, dtype=tf.int64)


@dataclasses.dataclass(frozen=True)
class StreamState:
    """What the train stream depends on besides the data config. With `step` it is the whole
    resume state (saved in each checkpoint); it has nothing per process."""

    seed: int
    num_examples: int
    global_batch_size: int
    version: int = ORDER_VERSION

    def at(self, step: int) -> dict[str, Any]:
        """The JSON-able state from which batch `step` is the next one."""
        return {**dataclasses.asdict(self), 'step': int(step)}

    def check_resume(self, saved: dict[str, Any]) -> int:
        """The step to continue from, or ValueError (one line) when the saved stream is not this
        one. A changed global batch is refused: the learning-rate schedule, the step count and
        the stream positions are all in steps of the saved batch."""
        version = saved.get('version')
        if version != self.version:
            raise ValueError(
                f"the checkpoint's data order has format version {version}, this code "
                f'{self.version}: resume with the code that wrote it, or start a new workdir'
            )
        if saved.get('global_batch_size') != self.global_batch_size:
            raise ValueError(
                f'the checkpoint was trained with {saved.get("global_batch_size")} images per '
                f'step, this run has {self.global_batch_size}: resume with the same batch_size '
                '(and gradient accumulation), or start a new workdir with init_from=<checkpoint>'
            )
        if saved.get('seed') != self.seed:
            raise ValueError(
                f'the checkpoint was trained with seed {saved.get("seed")}, this run has '
                f'{self.seed}: pass --config.seed={saved.get("seed")} to resume it'
            )
        if saved.get('num_examples') != self.num_examples:
            raise ValueError(
                f'the checkpoint was trained on {saved.get("num_examples")} training examples, '
                f'this run has {self.num_examples}: resume with the same dataset and train_split'
            )
        return int(saved['step'])
