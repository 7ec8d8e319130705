"""`privet flwr ARGS`: Flower's own `flwr` CLI, presenting the operator's client certificate.

Flower 1.41's `flwr` reads only `address`, `root-certificates` and `insecure` for a
SuperLink connection: it has no client-certificate option, so behind privet's proxy
(`privet deploy superlink`, which requires an operator certificate for the Control API) it
is refused. This runs the very same CLI in this process after one change: the Control API
client, when it dials an address that $FLWR_HOME/privet-operators.toml holds a credential
for (`privet deploy connection ... --operator-cert`), builds its TLS context with that
certificate and key loaded (`SSLContext.load_cert_chain`). Everything else -- commands,
options, output, the CA check of the SuperLink -- is Flower's.

The private key is read by this process only; nothing listens on the operator's machine.
Unlike privet.patches (speed-ups, which PRIVET_STOCK_LIBRARIES=1 leaves out), this is what
lets an operator in at all, so it is always installed here, and refuses with one line a
Flower it was not written for.
"""

from __future__ import annotations

import inspect
import ssl
import sys

EXPECTED = ["cls", "server_address", "insecure", "root_certificates", "interceptors",
            "retry_invoker"]


class CredentialHookError(RuntimeError):
    pass


def install() -> None:
    """Make Flower's Control API client present the operator certificate recorded for the
    address it dials. Refuses (CredentialHookError) a Flower whose client does not look
    as privet expects, rather than silently dialing without the credential."""
    import importlib.metadata

    from flwr.supercore.control.control_http_client import ControlHttpClient

    from privet.experiments.deploy import read_operator_credentials

    version = importlib.metadata.version("flwr")
    if not version.startswith("1.41."):
        raise CredentialHookError(f"flwr {version}: privet's operator credential hook was "
                                  "written for Flower 1.41")
    original = ControlHttpClient.from_server_address.__func__
    found = list(inspect.signature(original).parameters)
    if found != EXPECTED:
        raise CredentialHookError(
            f"this Flower's ControlHttpClient.from_server_address{tuple(found[1:])} is not "
            f"the one privet's operator credential hook was written for "
            f"{tuple(EXPECTED[1:])} (Flower 1.41)")
    credentials = read_operator_credentials()

    def from_server_address(cls, server_address, insecure, root_certificates, interceptors,
                            *, retry_invoker=None):
        entry = credentials.get(server_address)
        if entry is None or insecure:
            return original(cls, server_address, insecure, root_certificates, interceptors,
                            retry_invoker=retry_invoker)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # hostname check, CERT_REQUIRED
        if root_certificates is None:
            context.load_default_certs()
        elif isinstance(root_certificates, str):
            context.load_verify_locations(cafile=root_certificates)
        else:
            context.load_verify_locations(cadata=root_certificates.decode("ascii"))
        context.load_cert_chain(entry["certificate"], entry["key"])
        return cls(f"https://{server_address}", interceptors=interceptors, verify=context,
                   retry_invoker=retry_invoker)

    ControlHttpClient.from_server_address = classmethod(from_server_address)


def main(argv: list[str] | None = None) -> None:
    try:
        install()
    except (CredentialHookError, OSError, ValueError) as error:
        print(f"privet: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    from flwr.cli.app import app

    app(args=sys.argv[1:] if argv is None else argv, prog_name="flwr")


if __name__ == "__main__":
    main()
