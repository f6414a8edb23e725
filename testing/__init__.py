"""Helpers for tests and benchmarks: real servers, proxies and browsers on loopback."""
