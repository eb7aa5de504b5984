"""Shared test helpers: namespaces, fake nodes, the daemon harness, a fake systemd."""
