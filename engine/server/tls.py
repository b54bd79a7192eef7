"""TLS material checked before anything else: one message naming the file and what is wrong with it.

gRPC reports a bad certificate or key only when it binds the port (as "could not
bind"), which `moelink serve` does after loading the weights. These checks use
the standard library's `ssl` (OpenSSL), which parses the same PEM files and
tells a key that does not belong to its certificate apart from one that is not
a key at all.
"""
from __future__ import annotations

import ssl


class _Encrypted(Exception):
    pass


def _no_password():
    raise _Encrypted  # called by OpenSSL only for an encrypted key: never prompt on a terminal


def _read(path: str, field: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"{field}={path!r} is invalid: no such file.") from None
    except IsADirectoryError:
        raise ValueError(f"{field}={path!r} is invalid: a directory, not a PEM file.") from None
    except OSError as exc:
        raise ValueError(f"{field}={path!r} is invalid: unreadable ({exc.strerror or exc}).") from None


def _text(data: bytes, path: str, field: str, what: str) -> str:
    """The file as ASCII text holding a PEM block of `what` ("CERTIFICATE", "PRIVATE KEY")."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if "-----BEGIN" not in text:
        raise ValueError(f"{field}={path!r} is invalid: not a PEM file (no '-----BEGIN' line; "
                         f"DER files must be converted, e.g. with `openssl x509 -inform der`).")
    if what not in text:
        raise ValueError(f"{field}={path!r} is invalid: holds no PEM {what} block.")
    return text


def _load_certs(text: str, path: str, field: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cadata=text)
    except (ssl.SSLError, ValueError) as exc:
        raise ValueError(f"{field}={path!r} is invalid: its PEM certificate does not parse ({_reason(exc)}).") from None


def check_server_tls(cert_path: str, key_path: str) -> None:
    """ValueError naming the file and the problem: unreadable, not PEM, bad certificate, bad or encrypted key,
    or a key that does not match the (first) certificate."""
    cert_text = _text(_read(cert_path, "tls_cert"), cert_path, "tls_cert", "CERTIFICATE")
    key_text = _text(_read(key_path, "tls_key"), key_path, "tls_key", "PRIVATE KEY")
    del key_text  # only checked for being PEM; OpenSSL reads the file itself below
    _load_certs(cert_text, cert_path, "tls_cert")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert_path, key_path, password=_no_password)
    except _Encrypted:
        raise ValueError(f"tls_key={key_path!r} is invalid: the key is encrypted; gRPC needs an unencrypted PEM key "
                         f"(e.g. `openssl pkey -in KEY -out KEY.plain`).") from None
    except ssl.SSLError as exc:
        # KEY_VALUES_MISMATCH: another key of the same type; NO_CERTIFICATE_ASSIGNED: a key of another type.
        if getattr(exc, "reason", None) in ("KEY_VALUES_MISMATCH", "NO_CERTIFICATE_ASSIGNED"):
            raise ValueError(f"tls_key={key_path!r} is invalid: it does not match the certificate in "
                             f"tls_cert={cert_path!r} (the key of another certificate?).") from None
        raise ValueError(f"tls_key={key_path!r} is invalid: its PEM private key does not parse ({_reason(exc)}).") from None
    except OSError as exc:  # gone or unreadable between the two reads
        raise ValueError(f"tls_key={key_path!r} is invalid: unreadable ({exc.strerror or exc}).") from None


def check_ca_bundle(path: str, field: str = "tls_ca") -> bytes:
    """The bytes of a PEM CA bundle (or self-signed certificate) to trust; ValueError naming the file otherwise."""
    data = _read(path, field)
    _load_certs(_text(data, path, field, "CERTIFICATE"), path, field)
    return data


def _reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason or exc).strip() or type(exc).__name__
