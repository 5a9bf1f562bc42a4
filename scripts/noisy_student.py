"""Noisy Student self-training (Xie et al. 2020), resumable at any point:

    python scripts/noisy_student.py --config=configs/noisy_student.py --workdir=/tmp/ns \
        [--config.key=value ...]

Iteration 0 trains the teacher (``train.py`` on ``noisy_student.labeled_split``). Iteration k
>= 1: the latest teacher predicts ``noisy_student.unlabeled_split`` (evaluation mode, its own
eval preprocessing; each process predicts its part and writes it as a shard); the official
filter keeps confident images and balances the classes (``training/noisy_student.py``); a
noised student, at least as large as its teacher, trains on the labeled split plus those
pseudo-labels (``config.data.pseudo_labels``); it becomes the next teacher.

Layout of WORKDIR: ``teacher/`` (iteration 0), ``iter<k>/predictions/shard-*.npz``,
``iter<k>/pseudo_labels.npz`` (+ ``selection.json``, the per-class statistics),
``iter<k>/student/``, and ``noisy_student.json``: each model's test top-1. Every output is
written atomically and a training run resumes from its last checkpoint, so after a crash or a
``kill -9`` the same command continues where it stopped. ``--config.key=value`` arguments
apply to every run (teacher and students). Multi-process: start the same command on every
process with ``--coordinator_address``, ``--num_processes`` and ``--process_id`` (passed to
each ``train.py``; the predictions are split by ``--process_id``). Exit status 0 when every
iteration finished, 1 when a run failed, 2 after one line ``error: ...`` on bad input.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sweep.py
import sweep  # noqa: E402

from efficientnet import arch, cli, paths  # noqa: E402

SUMMARY_FILE = 'noisy_student.json'
DONE_FILE = 'noisy_student_done.json'
_TOP1 = re.compile(r'Final eval top-1: ([\d.]+)% \(EMA weights\), ([\d.]+)% \(raw weights\)')


class DriverError(cli.UserError, ValueError):
    """A Noisy Student run that cannot start (bad config or flags)."""


def _split_overrides(text: str) -> list[str]:
    """'a.b=1 c=x' -> ['--config.a.b=1', '--config.c=x']."""
    out = []
    for item in shlex.split(text or ''):
        if '=' not in item:
            raise DriverError(f'override {item!r} is not key=value')
        out.append(f'--config.{item}')
    return out


def _size(config) -> tuple[float, float]:
    variant = arch.get_variant(config.model.name)
    width = config.model.width if config.model.width is not None else variant.width
    depth = config.model.depth if config.model.depth is not None else variant.depth
    return float(width), float(depth)


class Driver:
    def __init__(self, args: argparse.Namespace, fixed: list[str]):
        import configs

        self.spec, self.root, self.fixed = args.config, args.workdir, fixed
        self.process_index = args.process_id or 0
        self.process_count = args.num_processes or 1
        self.dist = [
            f'--{k}={v}'
            for k, v in (
                ('coordinator_address', args.coordinator_address),
                ('num_processes', args.num_processes),
                ('process_id', args.process_id),
            )
            if v is not None
        ]
        problems = configs.override_problems(self.spec, fixed)
        if problems:
            raise DriverError(cli.format_problems('bad command line', problems))
        self.config = configs.parse_config(self.spec, fixed)
        from training import noisy_student

        problems = noisy_student.driver_problems(self.config)
        ns = self.config.noisy_student
        if not problems:
            self.noise = _split_overrides(ns.noise)
            self.students = [_split_overrides(s) for s in ns.students]
            teacher = self.config
            for k in range(1, ns.iterations + 1):
                args_k = self.student_overrides(k, '/dev/null')
                bad = configs.override_problems(self.spec, [*fixed, *args_k[:-1]])
                problems += [f'iteration {k}: {p}' for p in bad]
                if bad:
                    break
                student = configs.parse_config(self.spec, [*fixed, *args_k[:-1]])
                if any(s < t for s, t in zip(_size(student), _size(teacher))):
                    problems.append(
                        f'iteration {k}: the student (width, depth) {_size(student)} is smaller '
                        f'than its teacher {_size(teacher)}: Noisy Student trains an equal or '
                        'larger student (config.noisy_student.students)'
                    )
                teacher = student
        problems += paths.problems([('--workdir', self.root)])
        if problems:
            raise DriverError(cli.format_problems('noisy student not started', problems))

    # ------------------------------------------------------------------ layout

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def model_dir(self, k: int) -> str:
        return self.path('teacher') if k == 0 else self.path(f'iter{k}', 'student')

    def student_overrides(self, k: int, selection: str) -> list[str]:
        ns = self.config.noisy_student
        own = self.students[0 if len(self.students) == 1 else k - 1] if self.students else []
        return [
            *self.noise,
            *own,
            f'--config.data.unlabeled_split={ns.unlabeled_split}',
            f'--config.data.unlabeled_ratio={ns.unlabeled_ratio}',
            f'--config.data.pseudo_labels={selection}',  # last: checked separately
        ]

    # ------------------------------------------------------------------ phases

    def train(self, k: int, extra: list[str], term) -> dict:
        """Trains model k (0: the teacher) unless it finished before; returns its record."""
        workdir = self.model_dir(k)
        done = self._read(os.path.join(workdir, DONE_FILE))
        if done is not None:
            print(f'[{k}] {workdir}: finished before ({done["final_line"]})', flush=True)
            return done
        ns = self.config.noisy_student
        args = [
            f'--config={self.spec}',
            f'--workdir={workdir}',
            *self.fixed,
            f'--config.data.train_split={ns.labeled_split}',
            *extra,
            *self.dist,
        ]
        paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
        what = 'teacher' if k == 0 else 'student'
        print(f'[{k}] training the {what}: {sweep.command_line(args)}', flush=True)
        start = time.time()
        finished, last = sweep.run_trial(args, workdir, term)
        if not finished:
            tail = sweep._log_tail(os.path.join(workdir, sweep.LOG_FILE))
            raise RuntimeError(f'[{k}] the {what} run failed: {last}\n{tail}')
        m = _TOP1.search(last)
        record = {
            'final_line': last,
            'ema_top1': float(m.group(1)) / 100 if m else None,
            'raw_top1': float(m.group(2)) / 100 if m else None,
            'seconds': round(time.time() - start, 1),
        }
        self._write(os.path.join(workdir, DONE_FILE), record)
        print(f'[{k}] {what} finished: {last}', flush=True)
        return record

    def predict(self, k: int) -> None:
        """This process's shard of the teacher's predictions for iteration k."""
        from input_pipeline import pseudo_labels
        from training import noisy_student

        directory = self.path(f'iter{k}', 'predictions')
        out = noisy_student.shard_path(directory, self.process_index, self.process_count)
        if paths.as_path(out).exists():
            return
        from inference.loading import load_model

        teacher = load_model(self.model_dir(k - 1))
        data = self._unlabeled_data(teacher)
        ns = self.config.noisy_student
        start = time.time()
        shard = noisy_student.predict_shard(
            teacher,
            data,
            temperature=ns.temperature,
            batch_size=ns.predict_batch_size,
            process_index=self.process_index,
            process_count=self.process_count,
        )
        pseudo_labels.write_npz(out, shard)
        print(
            f'[{k}] predicted {len(shard["index"])} unlabeled images in '
            f'{time.time() - start:.0f} s: {out}',
            flush=True,
        )

    def _unlabeled_data(self, teacher):
        """The eval pipeline's config for the unlabeled split at the teacher's preprocessing."""
        data = self.config.data.copy_and_resolve_references()
        data.eval_split = self.config.noisy_student.unlabeled_split
        data.resolution = teacher.resolution
        data.crop_fraction = teacher.crop_fraction
        data.interpolation = teacher.interpolation
        data.pseudo_labels = None
        return data

    def select(self, k: int) -> str:
        """The selection file of iteration k (process 0 writes it, the others wait for it)."""
        from input_pipeline import pseudo_labels
        from training import noisy_student

        selection = self.path(f'iter{k}', 'pseudo_labels.npz')
        if paths.as_path(selection).exists():
            return selection
        if self.process_index != 0:
            noisy_student.wait_for(selection)
            return selection
        ns = self.config.noisy_student
        pred = noisy_student.gather_shards(self.path(f'iter{k}', 'predictions'), self.process_count)
        kept, stats = noisy_student.select(
            pred['classes'],
            pred['confidence'],
            num_classes=pred['probs'].shape[1],
            min_threshold=ns.min_threshold,
            images_per_class=ns.images_per_class,
            seed=self.config.seed + k,
        )
        if len(kept) == 0:
            raise RuntimeError(
                f'[{k}] no unlabeled image has confidence >= {ns.min_threshold}: lower '
                'config.noisy_student.min_threshold'
            )
        index = pred['index'][kept]
        self._write(
            self.path(f'iter{k}', 'selection.json'),
            {'selected': int(len(kept)), 'unique': int(len(set(kept.tolist()))), 'classes': stats},
        )
        if ns.hard_labels:
            pseudo_labels.write(selection, index, classes=pred['classes'][kept])
        else:
            pseudo_labels.write(selection, index, probs=pred['probs'][kept])
        print(
            f'[{k}] selected {len(kept)} pseudo-labeled rows '
            f'({len(set(kept.tolist()))} distinct images): {selection}',
            flush=True,
        )
        return selection

    def run(self) -> int:
        paths.as_path(self.root).mkdir(parents=True, exist_ok=True)
        summary = self._read(self.path(SUMMARY_FILE)) or {}
        with sweep._ForwardTerm() as term:
            try:
                records = [self.train(0, [], term)]
                for k in range(1, self.config.noisy_student.iterations + 1):
                    self.predict(k)
                    selection = self.select(k)
                    records.append(self.train(k, self.student_overrides(k, selection), term))
                    self._summarise(summary, records)
            except RuntimeError as e:
                print(f'error: {e}', file=sys.stderr, flush=True)
                return 1
        self._summarise(summary, records)
        for k, r in enumerate(records):
            what = 'teacher' if k == 0 else f'student {k}'
            print(f'{what}: EMA top-1 {100 * (r["ema_top1"] or 0):.2f}%', flush=True)
        return 0

    def _summarise(self, summary: dict, records: list[dict]) -> None:
        if self.process_index != 0:
            return
        summary['models'] = [
            {'model': 'teacher' if k == 0 else f'student {k}', 'workdir': self.model_dir(k), **r}
            for k, r in enumerate(records)
        ]
        self._write(self.path(SUMMARY_FILE), summary)

    def _read(self, path: str) -> dict | None:
        return sweep.read_json(path)

    def _write(self, path: str, record: dict) -> None:
        if self.process_index == 0:  # one writer; the others read what it wrote
            sweep.write_json(path, record)


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)


def _main(argv: list[str] | None) -> int:
    parser = cli.ArgumentParser(
        prog='python scripts/noisy_student.py',
        description=__doc__.split('\n\n')[0],
        epilog='Other arguments of the form --config.key=value apply to every run.',
    )
    parser.add_argument('--config', required=True, help='config file, as for train.py')
    parser.add_argument('--workdir', required=True, help='root directory, local or gs://')
    parser.add_argument('--coordinator_address', help='host:port of process 0 (multi-process)')
    parser.add_argument('--num_processes', type=int, help='processes (multi-process)')
    parser.add_argument('--process_id', type=int, help='this process (multi-process)')
    args, extra = parser.parse_known_args(argv)
    fixed = list(sweep._parse_fixed(extra) and extra)
    if args.num_processes is not None and not 0 <= (args.process_id or 0) < args.num_processes:
        raise DriverError(f'--process_id must be in [0, {args.num_processes})')
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    return Driver(args, fixed).run()


if __name__ == '__main__':
    sys.exit(main())
