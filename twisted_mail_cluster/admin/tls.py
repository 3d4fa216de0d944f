"""``mailcluster-admin tls show``: what a user must compare before trusting a certificate.

Mail clients (Thunderbird among them) show a self-signed certificate's
SHA-256 fingerprint and ask whether to trust it; this prints the same
fingerprint from the server's side, so the user can accept it knowingly.
Only certificates are read, never keys: the tool may run as a user who
cannot read the node's private key.
"""

from __future__ import annotations

from typing import TextIO

from ..config import Config
from ..tls.certificates import certificate_names, fingerprint, read_chain, self_signed_paths


class NoCertificateYet(ValueError):
    """No certificate is configured and the node has not made its self-signed one."""


def show_certificates(config: Config, stdout: TextIO) -> None:
    if config.tls.certificates:
        entries = [(c.certificate, c.key_name, c.names) for c in config.tls.certificates]
    else:
        certificate, _ = self_signed_paths(config.data_dir)
        if not certificate.exists():
            raise NoCertificateYet(
                f"no [tls] certificate is configured, and the node makes its self-signed one "
                f"({certificate}) at its first start: start it once, then run this again"
            )
        entries = [(certificate, "self-signed", ())]
    blocks = []
    for path, where, names in entries:
        leaf = read_chain(path, where)[0]
        kind = "self-signed: clients ask whether to trust it" if where == "self-signed" else f"[{where}]"
        blocks.append("\n".join([
            f"certificate  {path} ({kind})",
            f"names        {', '.join(names or certificate_names(leaf))}",
            f"valid until  {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
            f"SHA-256      {fingerprint(leaf)}",
        ]))
    stdout.write("\n\n".join(blocks) + "\n")
