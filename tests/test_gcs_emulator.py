"""The offline GCS harness (tests/gcs_emulator.py) works with the real clients a run uses on
gs:// paths: tf.io.gfile, etils.epath, orbax (google-cloud-storage + tensorstore) and clu's
TensorBoard writer. They run in one subprocess with the emulator's environment (one TensorFlow
import); what they wrote is then read back from the emulator by this process, through the
emulator's JSON API, and checked there.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from tests.gcs_emulator import free_port

BUCKET = 'harness'

# Each section records {'ok', 'value' or 'error', 'seconds'}; the last stdout line is the JSON.
_PRELUDE = """
import json, sys, time, traceback
results = {}
def section(fn):
    start = time.monotonic()
    try:
        results[fn.__name__] = {'ok': True, 'value': fn()}
    except Exception:
        results[fn.__name__] = {'ok': False, 'error': traceback.format_exc()}
    results[fn.__name__]['seconds'] = round(time.monotonic() - start, 2)
def outcome(fn):
    start = time.monotonic()
    try:
        out = {'returned': repr(fn())}
    except Exception as e:
        out = {'raised': f'{type(e).__module__}.{type(e).__qualname__}', 'message': str(e)[:400]}
    return {**out, 'seconds': round(time.monotonic() - start, 2)}
"""

_CLIENTS = """
import numpy as np
import tensorflow as tf
from etils import epath
root = 'gs://harness'

@section
def gfile():
    g, d = tf.io.gfile, root + '/gfile'
    g.makedirs(d + '/d1/d2')
    with g.GFile(d + '/a.txt', 'w') as f:
        f.write('hello gfile')
    out = {'read': g.GFile(d + '/a.txt').read(), 'exists': g.exists(d + '/a.txt')}
    g.rename(d + '/a.txt', d + '/b.txt')
    out.update(listdir=sorted(g.listdir(d)), glob=g.glob(d + '/*.txt'), isdir=g.isdir(d + '/d1'))
    return {**out, 'exists_after_rename': g.exists(d + '/a.txt')}

@section
def epath_():
    p = epath.Path(root) / 'epath'
    (p / 'x.txt').write_text('hello epath')
    return {'read': (p / 'x.txt').read_text(), 'exists': (p / 'x.txt').exists(),
            'iterdir': sorted(c.name for c in p.iterdir())}

@section
def orbax():
    import orbax.checkpoint as ocp
    tree = {'w': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': np.full(3, 7, np.int32)}
    with ocp.CheckpointManager(root + '/ckpt') as mngr:
        mngr.save(1, args=ocp.args.StandardSave(tree))
    with ocp.CheckpointManager(root + '/ckpt') as mngr:  # a new manager finds the step
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(tree))
        steps = list(mngr.all_steps())
    return {'steps': steps, 'restored': {k: v.tolist() for k, v in restored.items()}}

@section
def clu_tensorboard():
    from clu import metric_writers
    writer = metric_writers.SummaryWriter(root + '/tb')
    writer.write_scalars(3, {'loss': 0.5})
    writer.close()

@section
def missing_bucket():  # not tf.io.gfile.makedirs: under a missing bucket it never returns
    def write():
        with tf.io.gfile.GFile('gs://no-such-bucket/x', 'w') as f:
            f.write('x')
    return {
        'gfile_exists': outcome(lambda: tf.io.gfile.exists('gs://no-such-bucket/x')),
        'gfile_bucket_exists': outcome(lambda: tf.io.gfile.exists('gs://no-such-bucket')),
        'epath_exists': outcome(lambda: epath.Path('gs://no-such-bucket/x').exists()),
        'gfile_write': outcome(write),
    }

print(json.dumps(results))
"""

_OFFLINE = """
import tensorflow as tf
results = {'gfile_exists': outcome(lambda: tf.io.gfile.exists('gs://bucket/x'))}
print(json.dumps(results))
"""


def _run(script: str, env: dict, cwd) -> dict:
    """Runs `script` (after _PRELUDE) in a fresh Python; returns the JSON of its last line."""
    try:
        p = subprocess.run(
            [sys.executable, '-c', _PRELUDE + script],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f'client script hung for {e.timeout} s; its stderr: {e.stderr!r:.3000}')
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_harness_helpers(gcs_emulator):
    """write/list/read through the emulator's JSON API, without any client library: listings
    follow page tokens, names with '/', spaces and '#' survive, errors carry the status."""
    gcs_emulator.make_bucket('helpers')
    gcs_emulator.make_bucket('helpers')  # an existing bucket is kept
    names = [f'p/{i} #x' for i in range(5)]
    for i, name in enumerate(names):
        gcs_emulator.write_object('helpers', name, bytes([i, 0, 255]))
    first = json.loads(gcs_emulator._request('GET', '/storage/v1/b/helpers/o?maxResults=2'))
    assert len(first['items']) == 2 and first['nextPageToken']  # so paging is exercised below
    assert gcs_emulator.list_objects('helpers', 'p/', page_size=2) == sorted(names)
    assert gcs_emulator.read_object('helpers', names[3]) == bytes([3, 0, 255])
    with pytest.raises(RuntimeError, match='404'):
        gcs_emulator.read_object('helpers', 'p/missing')
    # The environment is for subprocesses only.
    assert os.environ.get('CURL_CA_BUNDLE') != gcs_emulator.env['CURL_CA_BUNDLE']


def test_server_stops_with_a_killed_test_process(tmp_path):
    """kill -9 of the process that started the emulator leaves no server behind."""
    script = (
        'import sys, time; from tests.gcs_emulator import GcsEmulator; '
        'e = GcsEmulator(sys.argv[1]); print(e.url, flush=True); time.sleep(600)'
    )
    owner = subprocess.Popen(
        [sys.executable, '-c', script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    url = owner.stdout.readline().strip()
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no env proxies
    assert direct.open(url + '/storage/v1/b', timeout=10).status == 200
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            direct.open(url + '/storage/v1/b', timeout=1)
        except OSError:
            return  # connection refused: the server is gone
        time.sleep(0.05)
    pytest.fail(f'the emulator at {url} outlived the process that started it')


@pytest.fixture(scope='module')
def clients(gcs_emulator, tools_env, tmp_path_factory):
    """The clients' results; they ran from an empty scratch directory (returned too)."""
    gcs_emulator.make_bucket(BUCKET)
    scratch = tmp_path_factory.mktemp('gcs_clients_cwd')
    return _run(_CLIENTS, {**tools_env, **gcs_emulator.env}, scratch), scratch


def _section(clients, name):
    result = clients[0][name]
    assert result['ok'], result['error']
    return result['value']


def test_tf_gfile(clients, gcs_emulator):
    value = _section(clients, 'gfile')
    assert value['read'] == 'hello gfile' and value['exists'] and value['isdir']
    assert value['listdir'] == ['b.txt', 'd1/'] and value['glob'] == ['gs://harness/gfile/b.txt']
    assert not value['exists_after_rename']
    names = gcs_emulator.list_objects(BUCKET, 'gfile/')
    assert 'gfile/b.txt' in names and 'gfile/a.txt' not in names and 'gfile/d1/d2/' in names
    assert gcs_emulator.read_object(BUCKET, 'gfile/b.txt') == b'hello gfile'


def test_etils_epath(clients, gcs_emulator):
    value = _section(clients, 'epath_')
    assert value == {'read': 'hello epath', 'exists': True, 'iterdir': ['x.txt']}
    assert gcs_emulator.read_object(BUCKET, 'epath/x.txt') == b'hello epath'


def test_orbax_checkpoint_manager(clients, gcs_emulator):
    value = _section(clients, 'orbax')
    assert value['steps'] == [1]
    assert value['restored'] == {'w': [[0, 1, 2], [3, 4, 5]], 'b': [7, 7, 7]}
    names = gcs_emulator.list_objects(BUCKET, 'ckpt/')
    assert any(n.startswith('ckpt/1/') for n in names), names
    assert not any('tmp' in n for n in names), names  # the save was finalised


def _event_scalars(data: bytes) -> dict:
    """{(step, tag): value} from a TensorBoard event file, parsed without TensorFlow: TFRecord
    framing (length, its crc, the record, its crc) around Event protos."""
    from tensorboard.compat.proto import event_pb2

    scalars, i = {}, 0
    while i < len(data):
        (length,) = struct.unpack('<Q', data[i : i + 8])
        event = event_pb2.Event.FromString(data[i + 12 : i + 12 + length])
        i += 12 + length + 4
        for v in event.summary.value:
            t = v.tensor
            scalars[event.step, v.tag] = (
                t.float_val[0] if t.float_val else np.frombuffer(t.tensor_content, np.float32)[0]
            )
    return scalars


def test_clu_tensorboard_writer(clients, gcs_emulator):
    _section(clients, 'clu_tensorboard')
    (name,) = [n for n in gcs_emulator.list_objects(BUCKET, 'tb/') if 'tfevents' in n]
    assert _event_scalars(gcs_emulator.read_object(BUCKET, name)) == {(3, 'loss'): 0.5}


def test_nothing_written_locally(clients):
    assert not list(clients[1].iterdir())  # no gs:// path was taken for a local one


def test_missing_bucket(clients):
    """A bucket that does not exist: existence checks say False at once, a write raises
    NotFoundError (404). tf.io.gfile.makedirs under such a bucket loops forever instead (TF
    walks up to the bucket root, which never exists), so code must check the bucket first."""
    value = _section(clients, 'missing_bucket')
    print(json.dumps(value, indent=1))
    for check in ('gfile_exists', 'gfile_bucket_exists', 'epath_exists'):
        assert value[check].get('returned') == 'False', value[check]
    assert value['gfile_write'].get('raised', '').endswith('errors_impl.NotFoundError')
    assert '404' in value['gfile_write']['message']


@pytest.mark.slow
def test_no_emulator_fails_offline(tools_env, tmp_path):
    """Without the emulator's environment, credentials or a network, tf.io.gfile.exists raises
    AbortedError (it does not return False) without leaving the machine: the metadata server and
    the https proxy are closed loopback ports. TensorFlow first retries the metadata server
    (~9 s), then the request (default 10 retries with backoff, ~200 s; 1 here)."""
    env = {k: v for k, v in tools_env.items() if k != 'GOOGLE_APPLICATION_CREDENTIALS'}
    closed = f'http://127.0.0.1:{free_port()}'
    env.update(
        {
            'https_proxy': closed,
            'HTTPS_PROXY': closed,
            'http_proxy': closed,
            'no_proxy': '127.0.0.1,localhost',
            'NO_PROXY': '127.0.0.1,localhost',
            'GCE_METADATA_HOST': '127.0.0.1:9',
            'GCE_METADATA_IP': '127.0.0.1:9',
            'GCE_METADATA_ROOT': '127.0.0.1:9',
            'CLOUDSDK_CONFIG': str(tmp_path / 'cloudsdk'),
            'GCS_RETRY_CONFIG_MAX_RETRIES': '1',
        }
    )
    for k in (
        'STORAGE_EMULATOR_HOST',
        'TENSORSTORE_GCS_HTTP_URL',
        'CURL_CA_BUNDLE',
        'NO_GCE_CHECK',
    ):
        env.pop(k, None)
    os.makedirs(tmp_path / 'cloudsdk')
    value = _run(_OFFLINE, env, tmp_path)['gfile_exists']
    print(json.dumps(value, indent=1))
    assert value.get('raised', '').endswith('errors_impl.AbortedError'), value
    assert 'Could not connect' in value['message']
