"""twistd dropin: ``twistd mailcluster``.

Kept tiny on purpose: twistd imports every dropin to list its subcommands,
so the real work is imported only when ``mailcluster`` is chosen.
"""

from twisted.application.service import ServiceMaker

mailcluster = ServiceMaker(
    "twisted-mail-cluster",
    "twisted_mail_cluster.tap",
    "SMTP, POP3 and IMAP on one mailbox store (embedded SQLite, or a Cassandra cluster).",
    "mailcluster",
)
