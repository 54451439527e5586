"""Prefix caching with per-request steering: the ``cache_salt`` a request's KV blocks are keyed
on (no vLLM import here; ``vllm_plugin`` applies it where vLLM's engine core makes each request).

vLLM keys a cached KV block on its tokens, its parent block and the request's ``cache_salt``
(mixed into the first block's hash, so every later block of the request differs too). A block
computed under one steering holds that steering's activations, so its salt must say which
steering and strength computed it:

    steered:    "lineas_fast/<steering digest>/<strength, float.hex>" + ("/" + client salt)
    unsteered:  the client's salt as it is (None: shared with every unsteered request), except a
                client salt that starts with "lineas_fast/", which becomes
                "lineas_fast/none/" + that salt, so no client can forge a steered request's salt

Requests with the same steering (same values: the digest of its maps, not only its name), the
same strength and the same client salt share cached prefixes; any other pair never does. A
request whose steering arguments cannot be read gets a salt of its own (its request id) and
shares nothing; the worker ends it.
"""

from __future__ import annotations

from lineas_fast.serve import registry, requests

PREFIX = "lineas_fast/"


def salt_for(extra_args, client_salt: str | None, request_id: str) -> str | None:
    """The cache salt of a request with these ``extra_args`` and the client's own salt."""
    try:
        choice = requests.parse_request(extra_args)
    except Exception:  # noqa: BLE001 -- an unservable request shares no block
        return f"{PREFIX}unservable/{request_id}"
    if choice is None:
        if client_salt is not None and client_salt.startswith(PREFIX):
            return f"{PREFIX}none/{client_salt}"
        return client_salt
    name, strength = choice
    salt = f"{PREFIX}{registry.digest(name)}/{float(strength).hex()}"
    return salt if client_salt is None else f"{salt}/{client_salt}"
