"""efficientnet/paths.py on local paths and without credentials (the gs:// side against a real
emulator is tests/test_gcs.py): URLs stay URLs, atomic writes leave no temporary file and keep
the umask's mode, and a gs:// path without credentials is refused in one line."""

import os
import stat

from efficientnet import paths


def test_absolute_leaves_urls_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.absolute('gs://bucket/run/') == 'gs://bucket/run'
    assert paths.absolute('gs://bucket') == 'gs://bucket'
    assert paths.absolute('run') == str(tmp_path / 'run')
    assert str(paths.as_path('gs://bucket/run', 'checkpoints')) == 'gs://bucket/run/checkpoints'


def test_write_atomic_replaces_whole_files_with_the_umask_mode(tmp_path):
    target = tmp_path / 'a' / 'b' / 'config.json'
    assert paths.write_atomic(target, '{"x": 1}') == str(target)
    assert paths.write_atomic(target, b'{"x": 2}') == str(target)
    assert target.read_text() == '{"x": 2}'
    assert os.listdir(target.parent) == ['config.json']  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_listdir_sorted_and_empty_for_a_missing_directory(tmp_path):
    for name in ('10', '2', 'x'):
        (tmp_path / name).mkdir()
    assert paths.listdir(tmp_path) == ['10', '2', 'x']
    assert paths.listdir(tmp_path / 'missing') == []


def test_local_paths_need_no_check():
    assert paths.problem('/data/run') is None and paths.problem(None) is None
    assert paths.problem('gs://') == 'no bucket named (expected gs://BUCKET/...)'


def test_gs_path_without_credentials_is_refused_in_one_line(tmp_path, monkeypatch):
    """google-auth's own search (no key file, no gcloud config, no metadata server) finds
    nothing: the message names the path and how to get credentials."""
    for name in ('GOOGLE_APPLICATION_CREDENTIALS', 'STORAGE_EMULATOR_HOST'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('CLOUDSDK_CONFIG', str(tmp_path))  # an empty gcloud config
    for name in ('GCE_METADATA_HOST', 'GCE_METADATA_IP'):
        monkeypatch.setenv(name, '127.0.0.1:9')  # the metadata server refuses at once
    paths._bucket_problem.cache_clear()
    try:
        [line] = paths.problems([('--workdir', 'gs://some-bucket/run'), ('--output', '/tmp/x')])
    finally:
        paths._bucket_problem.cache_clear()
    assert line.startswith('--workdir=gs://some-bucket/run: no Google Cloud credentials found')
    assert 'gcloud auth application-default login' in line and '\n' not in line
