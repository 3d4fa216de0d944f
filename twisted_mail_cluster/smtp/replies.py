"""SMTP replies with enhanced status codes (RFC 3463, RFC 5248, RFC 2034).

One value per reply, so that the protocol, the delivery code and the tests
speak of the same thing; texts follow Postfix's where one exists, because
that is what administrators grep their logs and bounces for.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def message(self) -> bytes:
        """The part after the code, as ``SMTP.sendCode`` wants it."""
        text = f"{self.enhanced} {self.text}" if self.enhanced else self.text
        return text.encode("ascii", "replace")


OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
BYE = Reply(221, "2.0.0", "Bye")
VRFY_REFUSED = Reply(252, "2.5.2", "Cannot VRFY user, but will accept message for local users")

AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Error: authentication failed")
AUTH_TEMPORARY = Reply(454, "4.7.0", "Temporary authentication failure, try again later")
#: Refused before the password was looked at (login_guard.py).
AUTH_THROTTLED = Reply(454, "4.7.0", "Too many login attempts, try again later")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many failed authentications, closing connection")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors")
AUTH_NEEDS_ENCRYPTION = Reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")
AUTH_BAD_RESPONSE = Reply(501, "5.5.2", "Cannot decode response")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_ALREADY = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")

BAD_SYNTAX = Reply(500, "5.5.2", "Error: bad syntax")
UNKNOWN_COMMAND = Reply(502, "5.5.2", "Error: command not recognized")
COMMAND_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
STARTTLS_UNAVAILABLE = Reply(502, "5.5.1", "Error: STARTTLS is not available")
STARTTLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
STARTTLS_ACTIVE = Reply(554, "5.5.1", "Error: TLS already active")
STARTTLS_SYNTAX = Reply(501, "5.5.4", "Syntax: STARTTLS")
STARTTLS_AFTER_AUTH = Reply(503, "5.5.1", "Error: STARTTLS after authentication")
STARTTLS_IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")

UNKNOWN_USER = Reply(550, "5.1.1", "Recipient address rejected: User unknown")
RELAY_DENIED = Reply(
    550,
    "5.7.1",
    "Relay access denied: this server only accepts mail for its own domains;"
    " outbound delivery is not available in this version",
)
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
LOOKUP_FAILED = Reply(451, "4.3.0", "Temporary lookup failure, try again later")

START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
STORE_FAILED = Reply(451, "4.3.0", "Error: temporary failure storing the message, try again later")
INTERNAL_ERROR = Reply(421, "4.3.0", "Error: internal error, closing connection")
TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded")


def message_too_big(limit: int) -> Reply:
    return Reply(552, "5.3.4", f"Error: message file too big (limit {limit} bytes)")


def line_too_long(limit: int) -> Reply:
    return Reply(
        554, "5.6.0", f"Error: message has a line longer than {limit} bytes (RFC 5321 4.5.3.1.6)"
    )


def stored(transaction: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: stored as {transaction}")
