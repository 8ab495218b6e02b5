"""Runs Autobahn|Testsuite's `wstest` with `localhost` and `*.localhost` resolving to 127.0.0.1
(RFC 6761, as browsers do), so it can reach a tunnel at `ws://NAME.localhost:PORT`.

    python2.7 wstest.py SITE_DIR -m fuzzingclient -s SPEC.json
"""
import site
import socket
import sys

site.addsitedir(sys.argv[1])

_getaddrinfo = socket.getaddrinfo
_gethostbyname = socket.gethostbyname


def _loopback(host):
    if host and (host == "localhost" or host.endswith(".localhost")):
        return "127.0.0.1"
    return host


socket.getaddrinfo = lambda host, *a, **k: _getaddrinfo(_loopback(host), *a, **k)
socket.gethostbyname = lambda host: _gethostbyname(_loopback(host))

from autobahntestsuite.wstest import run  # noqa: E402

sys.argv = ["wstest"] + sys.argv[2:]
run()
