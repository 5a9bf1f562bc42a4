"""Plots training curves of one or more runs from their TensorBoard event files into one PNG.

    python scripts/plot_metrics.py WORKDIR [WORKDIR ...] --output curves.png

One subplot per quantity (loss, top-1 accuracy, learning rate), one colour per run, train
metrics as solid lines and eval metrics (EMA weights by default) as dashed lines with markers.

``read_scalars`` reads the event files train.py writes through clu (TF2 summaries: scalars are
stored as 0-d tensors) with TensorBoard's protos and a plain TFRecord reader, which avoids
importing TensorFlow for local workdirs; sweep_report.py uses it too. Workdirs and the output
may be local or gs://.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import struct
import sys
from collections.abc import Iterator, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from efficientnet import paths  # noqa: E402

EVENT_GLOB = 'events.out.tfevents.*'


def _records(path: str) -> Iterator[bytes]:
    """The records of a TFRecord file: uint64 length, uint32 CRC of it, data, uint32 CRC. A
    record cut short (a run still writing) ends the file."""
    with paths.as_path(path).open('rb') as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack('<Q', header[:8])
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                return
            yield data


def read_scalars(workdir: str, wall_time: bool = False) -> dict[str, list[tuple]]:
    """{tag: [(step, value), ...] sorted by step} from the event files directly in ``workdir``.
    A resumed run writes a new file and may log a step again; the later file wins. With
    ``wall_time``, each point is (step, value, seconds since the run's first event): the first
    event file is opened as train.py starts, before it compiles anything, and the time of a
    resumed run includes the pause before it resumed."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.util import tensor_util

    by_tag: dict[str, dict[int, tuple[float, float]]] = {}
    start = math.inf
    for path in sorted(str(p) for p in paths.as_path(workdir).glob(EVENT_GLOB)):
        for record in _records(path):
            event = event_pb2.Event.FromString(record)
            start = min(start, event.wall_time)
            if not event.HasField('summary'):
                continue
            for value in event.summary.value:
                if value.HasField('simple_value'):
                    x = float(value.simple_value)
                elif value.HasField('tensor'):
                    array = tensor_util.make_ndarray(value.tensor)
                    if array.size != 1 or array.dtype.kind not in 'fiub':
                        continue  # not a scalar (images, text)
                    x = float(array.reshape(()))
                else:
                    continue
                by_tag.setdefault(value.tag, {})[int(event.step)] = (x, event.wall_time)
    return {
        tag: [(step, x, t - start) if wall_time else (step, x) for step, (x, t) in points]
        for tag, points in ((tag, sorted(p.items())) for tag, p in by_tag.items())
    }


def run_labels(workdirs: Sequence[str]) -> list[str]:
    """Each workdir's name, or its path below the common parent when names repeat."""
    names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    if len(set(names)) == len(names):
        return names
    full = [paths.absolute(w) for w in workdirs]
    common = os.path.commonpath(full)
    return [os.path.relpath(p, os.path.dirname(common)) for p in full]


PANELS = (  # (title, train tag, eval tag without the weights prefix)
    ('loss', 'train/loss', 'loss'),
    ('top-1 accuracy', 'train/top1', 'top1'),
    ('learning rate', 'train/learning_rate', None),
)


def plot_runs(workdirs: Sequence[str], output: str, weights: str = 'ema') -> None:
    """Writes the PNG; raises ValueError naming a workdir without event files."""
    runs = []
    for w in workdirs:
        if not paths.as_path(w).is_dir():
            raise ValueError(f'{w} is not a run directory')
        scalars = read_scalars(w)
        if not scalars:
            raise ValueError(f'{w}: no TensorBoard event files with scalars ({EVENT_GLOB})')
        runs.append(scalars)
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4), squeeze=False)
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for ax, (title, train_tag, eval_name) in zip(axes[0], PANELS):
        for i, (label, scalars) in enumerate(zip(run_labels(workdirs), runs)):
            colour = colours[i % len(colours)]
            if train_tag in scalars:
                steps, values = zip(*scalars[train_tag])
                ax.plot(steps, values, color=colour, label=label)
            eval_tag = f'eval/{weights}_{eval_name}' if eval_name else None
            if eval_tag in scalars:
                steps, values = zip(*scalars[eval_tag])
                ax.plot(
                    steps,
                    values,
                    color=colour,
                    linestyle='--',
                    marker='o',
                    markersize=3,
                    label=None if train_tag in scalars else label,
                )
        ax.set_title(
            title + (f' (solid: train, dashed: eval {weights})' if eval_name else ''), fontsize=9
        )
        ax.set_xlabel('step')
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, output)
    plt.close(fig)


def save_figure(fig, path: str) -> None:
    """Writes a matplotlib figure as PNG to ``path``, local or gs:// (matplotlib writes to local
    files or file objects only)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=100)
    paths.write_atomic(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('workdirs', nargs='+', help='run workdirs (train.py --workdir)')
    parser.add_argument('--output', required=True, help='PNG file to write (local or gs://)')
    parser.add_argument(
        '--weights',
        choices=('ema', 'raw'),
        default='ema',
        help='which eval metrics to draw (default: ema)',
    )
    ns = parser.parse_args(argv)
    try:
        plot_runs(ns.workdirs, ns.output, ns.weights)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'wrote {ns.output}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
