"""Temporal beyond loopback: `temporal.tls` (mTLS) and `temporal.api_key`.

The dev server cannot listen with TLS (`temporal server start-dev` has no TLS flags), so a real
TLS endpoint stands in front of it: a TLS-terminating TCP relay that demands a client certificate
signed by the test's CA and speaks ALPN h2, as a cluster's frontend does. The gateway is started
from settings alone and must reach Temporal through it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from temporalio.testing import WorkflowEnvironment

from api.temporal_client import connect_options, connect_temporal
from modelium.config import ConfigError, Settings, load_settings
from tests.helpers import make_settings, wait_for
from workers.serve import Running, serve

SERVER_NAME = "temporal.cluster.test"


Signer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: Signer | None,
    *,
    ca: bool = False,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path.with_suffix(".crt"), path.with_suffix(".key")


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("modelium test CA", ca_key, None, ca=True)
    server_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    server = _cert(SERVER_NAME, server_key, (ca, ca_key), san=[x509.DNSName(SERVER_NAME)])
    client = _cert("modelium-worker", client_key, (ca, ca_key))
    ca_crt, _ = _write(tmp_path / "ca", ca, ca_key)
    server_crt, server_pem = _write(tmp_path / "server", server, server_key)
    client_crt, client_pem = _write(tmp_path / "client", client, client_key)
    return {
        "ca": ca_crt,
        "server_cert": server_crt,
        "server_key": server_pem,
        "client_cert": client_crt,
        "client_key": client_pem,
    }


@contextlib.asynccontextmanager
async def tls_frontend(pki: dict[str, Path], upstream: str) -> AsyncIterator[int]:
    """A TLS endpoint in front of `upstream` (host:port) that requires a client certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca"]))
    context.load_cert_chain(pki["server_cert"], pki["server_key"])
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    host, port = upstream.rsplit(":", 1)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    relays: set[asyncio.Task[None]] = set()

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        relays.add(task := asyncio.current_task())  # type: ignore[arg-type]
        try:
            server_reader, server_writer = await asyncio.open_connection(host, int(port))
            await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))
        except asyncio.CancelledError:
            client_writer.close()
        finally:
            relays.discard(task)  # type: ignore[arg-type]

    server = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(relays):
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)


def _tls_settings(tmp_path: Path, port: int, pki: dict[str, Path], **tls: object) -> Settings:
    chosen = {
        "ca_cert": str(pki["ca"]),
        "client_cert": str(pki["client_cert"]),
        "client_key": str(pki["client_key"]),
        "server_name": SERVER_NAME,
        **tls,
    }
    return make_settings(
        tmp_path, temporal={"address": f"127.0.0.1:{port}", "tls": {k: v for k, v in chosen.items() if v is not None}}
    )


async def test_gateway_reaches_temporal_over_mtls(
    temporal_env: WorkflowEnvironment, tmp_path: Path, pki: dict[str, Path]
) -> None:
    upstream = temporal_env.client.service_client.config.target_host
    async with tls_frontend(pki, upstream) as port:
        settings = _tls_settings(tmp_path, port, pki)
        stop, started = asyncio.Event(), asyncio.Event()
        running: list[Running] = []

        def ready(r: Running) -> None:
            running.append(r)
            started.set()

        task = asyncio.create_task(serve(settings, stop, control=False, node=False, watch=False, on_ready=ready))
        try:
            await wait_for(lambda: started.is_set() or task.done(), timeout=60, what="the gateway to start")
            task.done() and task.result()
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running[0].gateway_port}") as http:
                assert (await http.get("/ready")).status_code == 200
                listed = await http.get("/models")
                assert listed.status_code == 200, listed.text
        finally:
            stop.set()
            await task

        # The frontend really demands TLS and the client's certificate: without either, no answer.
        for missing in (
            {"client_cert": None, "client_key": None},
            {"enabled": False, "ca_cert": None, "client_cert": None, "client_key": None, "server_name": None},
        ):
            with pytest.raises(RuntimeError, match="Failed client connect"):
                await connect_temporal(_tls_settings(tmp_path, port, pki, **missing))


async def test_wrong_server_name_is_refused(
    tmp_path: Path, pki: dict[str, Path], temporal_env: WorkflowEnvironment
) -> None:
    upstream = temporal_env.client.service_client.config.target_host
    async with tls_frontend(pki, upstream) as port:
        with pytest.raises(RuntimeError, match="(?i)certificate|tls|handshake|connect"):
            await connect_temporal(_tls_settings(tmp_path, port, pki, server_name="someone.else.test"))


def test_tls_and_api_key_settings(tmp_path: Path, pki: dict[str, Path]) -> None:
    env = {
        "MODELIUM_TEMPORAL__ADDRESS": "ns.acct.tmprl.cloud:7233",
        "MODELIUM_TEMPORAL__API_KEY": "sekrit",
        "MODELIUM_TEMPORAL__NAMESPACE": "ns.acct",
    }
    cloud = load_settings(None, environ=env)
    options = connect_options(cloud)
    # An API key alone means Temporal Cloud: TLS with the system's roots, the key as bearer token.
    assert options["api_key"] == "sekrit" and options["namespace"] == "ns.acct"
    assert options["tls"].server_root_ca_cert is None and options["tls"].client_cert is None
    assert "sekrit" not in cloud.model_dump_json(), "the API key is never printed"
    plain = load_settings(None, environ={"MODELIUM_TEMPORAL__ADDRESS": "temporal:7233"})
    assert "tls" not in connect_options(plain) and "api_key" not in connect_options(plain)
    explicit_off = {**env, "MODELIUM_TEMPORAL__TLS__ENABLED": "false"}
    assert "tls" not in connect_options(load_settings(None, environ=explicit_off))

    bad = [
        (
            {"MODELIUM_TEMPORAL__TLS__CLIENT_CERT": str(pki["client_cert"]), "MODELIUM_TEMPORAL__ADDRESS": "t:7233"},
            "client_cert and client_key go together",
        ),
        (
            {"MODELIUM_TEMPORAL__TLS__CA_CERT": str(tmp_path / "missing.pem"), "MODELIUM_TEMPORAL__ADDRESS": "t:7233"},
            "temporal.tls.ca_cert: Path does not point to a file",
        ),
        ({"MODELIUM_TEMPORAL__API_KEY": "k"}, "set temporal.address too"),
        (
            {
                "MODELIUM_TEMPORAL__TLS__ENABLED": "false",
                "MODELIUM_TEMPORAL__TLS__SERVER_NAME": "x",
                "MODELIUM_TEMPORAL__ADDRESS": "t:7233",
            },
            "enabled is false",
        ),
    ]
    for environ, message in bad:
        with pytest.raises(ConfigError, match=message):
            load_settings(None, environ=environ)
