"""Backdoor attacks, one module each behind the `Attack` interface in attacks/base.py."""
