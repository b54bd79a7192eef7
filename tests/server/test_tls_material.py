"""TLS material is checked before anything loads, and each mistake is named: file and problem.

Before, a key that did not belong to its certificate was reported as "could not
bind ... (in use, or no such address)", and a file that was not PEM was found
only once the weights had loaded.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from moelink.engine.server.config import ServerConfig
from tests.helpers import zygote
from tests.helpers.grpc_server import child_env


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA; a server certificate it signed and its key; a second RSA key; an EC key; an encrypted key; a DER cert."""
    d = tmp_path_factory.mktemp("pki")
    p = {name: str(d / name) for name in ("ca.pem", "ca.key", "server.pem", "server.key", "server.csr", "other.key",
                                          "ec.key", "encrypted.key", "server.der", "san.ext")}
    try:
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", p["ca.key"], "-out", p["ca.pem"],
                 "-days", "1", "-subj", "/CN=test-ca")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", p["server.key"], "-out", p["server.csr"],
                 "-subj", "/CN=localhost")
        with open(p["san.ext"], "w") as f:
            f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl("x509", "-req", "-in", p["server.csr"], "-CA", p["ca.pem"], "-CAkey", p["ca.key"], "-CAcreateserial",
                 "-out", p["server.pem"], "-days", "1", "-extfile", p["san.ext"])
        _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", p["other.key"])
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", p["ec.key"])
        _openssl("pkey", "-in", p["server.key"], "-aes256", "-passout", "pass:secret", "-out", p["encrypted.key"])
        _openssl("x509", "-in", p["server.pem"], "-outform", "der", "-out", p["server.der"])
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"openssl could not make test certificates: {exc}")
    garbage_cert, garbage_key = d / "garbage.pem", d / "garbage.key"
    garbage_cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    garbage_key.write_text("-----BEGIN PRIVATE KEY-----\nMIIBnotakey\n-----END PRIVATE KEY-----\n")
    p["garbage.pem"], p["garbage.key"] = str(garbage_cert), str(garbage_key)
    return p


def _config_error(cert: str, key: str) -> str:
    with pytest.raises(ValueError) as err:
        ServerConfig(tls_cert=cert, tls_key=key)
    return str(err.value)


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_good_pair_passes(pki):
    assert ServerConfig(tls_cert=pki["server.pem"], tls_key=pki["server.key"]).tls


@pytest.mark.parametrize("key", ["other.key", "ec.key"])
def test_key_of_another_certificate(pki, key):
    msg = _config_error(pki["server.pem"], pki[key])
    assert msg.startswith(f"tls_key={pki[key]!r} is invalid: it does not match the certificate in "
                          f"tls_cert={pki['server.pem']!r}"), msg
    assert "bind" not in msg


@pytest.mark.parametrize("cert, key, field, problem", [
    ("server.der", "server.key", "tls_cert", "not a PEM file"),
    ("server.pem", "server.der", "tls_key", "not a PEM file"),
    ("garbage.pem", "server.key", "tls_cert", "its PEM certificate does not parse"),
    ("server.key", "server.key", "tls_cert", "holds no PEM CERTIFICATE block"),
    ("server.pem", "server.pem", "tls_key", "holds no PEM PRIVATE KEY block"),
    ("server.pem", "garbage.key", "tls_key", "its PEM private key does not parse"),
    ("server.pem", "encrypted.key", "tls_key", "the key is encrypted"),
])
def test_each_mistake_names_file_and_problem(pki, cert, key, field, problem):
    msg = _config_error(pki[cert], pki[key])
    named = pki[cert] if field == "tls_cert" else pki[key]
    assert msg.startswith(f"{field}={named!r} is invalid: {problem}"), msg


def test_unreadable_file(pki, tmp_path, monkeypatch):
    from moelink.engine.server import tls

    locked = tmp_path / "locked.key"
    locked.write_bytes(open(pki["server.key"], "rb").read())
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads anything: make the read fail as it would for another user
        real_open = open

        def deny(path, *args, **kwargs):
            if str(path) == str(locked):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(tls, "open", deny, raising=False)
    msg = _config_error(pki["server.pem"], str(locked))
    assert msg.startswith(f"tls_key={str(locked)!r} is invalid: unreadable (Permission denied)"), msg


@pytest.mark.parametrize("ca, problem", [
    ("server.der", "not a PEM file"), ("garbage.pem", "its PEM certificate does not parse"),
    ("server.key", "holds no PEM CERTIFICATE block"), ("missing.pem", "no such file"),
])
def test_bad_ca_bundle_is_named(pki, tmp_path, ca, problem):
    from moelink.engine.server.client import open_channel

    path = pki.get(ca, str(tmp_path / ca))
    with pytest.raises(ValueError) as err:
        open_channel("127.0.0.1:1", path, None)
    assert str(err.value).startswith(f"tls_ca={path!r} is invalid: {problem}"), err.value
    channel, _ = open_channel("127.0.0.1:1", pki["ca.pem"], None)  # a good bundle still opens a channel
    channel.close()


def test_serve_refuses_bad_tls_before_loading_anything(pki, tmp_path):
    """`moelink serve` names the key at once: with a model path that does not exist, the TLS error still comes first."""
    t0 = time.monotonic()
    proc = zygote.run([sys.executable, "-m", "moelink.engine.api.cli", "serve", str(tmp_path / "no-such-model"),
                           "--host", "127.0.0.1", "--port", "0", "--tls-cert", pki["server.pem"],
                           "--tls-key", pki["other.key"]],
                          capture_output=True, text=True, env=child_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"tls_key={pki['other.key']!r} is invalid: it does not match the certificate" in proc.stderr, proc.stderr
    assert "could not bind" not in proc.stderr and "no-such-model" not in proc.stderr
    assert time.monotonic() - t0 < 60


def test_stats_names_a_bad_ca(pki):
    proc = zygote.run([sys.executable, "-m", "moelink.engine.api.cli", "stats", "--target", "127.0.0.1:1",
                           "--tls-ca", pki["server.der"], "--timeout", "2"],
                          capture_output=True, text=True, env=child_env(), timeout=120)
    assert proc.returncode == 2
    assert f"tls_ca={pki['server.der']!r} is invalid: not a PEM file" in proc.stderr, proc.stderr
