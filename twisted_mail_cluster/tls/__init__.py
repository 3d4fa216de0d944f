"""TLS for the node's own listeners: certificates, the server side of handshakes, sessions."""
