"""twisted-mail-cluster: SMTP, POP3 and IMAP over one mailbox store."""

__version__ = "0.1.0"
