"""The HTTP connection pools of the SDK clients that speak ``requests`` (google-cloud-storage, azure-core), sized for
the transfers that share them (:func:`~cloudckpt.concurrency.http_pool_size`): requests keeps 10 connections per
host by default, fewer than a pull of 16 ranges at once uses."""

from __future__ import annotations

from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

_PROTOCOLS = ("https://", "http://")


def size_pool(session: requests.Session, size: int) -> None:
    """Give ``session``'s plain adapters a pool of ``size`` connections per host, keeping their retry settings (an
    adapter of another kind, e.g. google-auth's mutual-TLS one, is left as it is)."""
    for prefix in _PROTOCOLS:
        adapter = session.adapters.get(prefix)
        if type(adapter) is HTTPAdapter:
            session.mount(prefix, HTTPAdapter(pool_connections=size, pool_maxsize=size,
                                              max_retries=adapter.max_retries))


class _AzureAdapter(HTTPAdapter):
    """azure-core's own adapter settings (32 KiB send blocks, as its BiggerBlockSizeHTTPAdapter), with our pool."""

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, blocksize=32768, **pool_kwargs)


def azure_session(size: int) -> requests.Session:
    """The session azure-core's RequestsTransport would make (no urllib3 retries: the SDK's retry policy and ours
    retry), with ``size`` connections per host."""
    session = requests.Session()
    adapter = _AzureAdapter(pool_connections=size, pool_maxsize=size,
                            max_retries=Retry(total=False, redirect=False, raise_on_status=False))
    for prefix in _PROTOCOLS:
        session.mount(prefix, adapter)
    return session
