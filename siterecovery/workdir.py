"""Create the embedded default's work directory: vault, replica store, key file, TLS files.

One implementation behind ``siterecovery vault init``, the first start of ``siterecovery up``
and the demo. The store is **encrypted by default** (DESIGN §6): AES-256-GCM under the key
file's data key. Opting out is allowed, and callers print :data:`UNENCRYPTED_WARNING`.
Everything is created 0600 in 0700 directories (:mod:`siterecovery.fsutil`).
"""

from __future__ import annotations

from siterecovery.fsutil import private_dir
from siterecovery.settings import Settings
from siterecovery.store.backend import open_backend
from siterecovery.store.keys import StoreKeys
from siterecovery.store.repository import ReplicaStore
from siterecovery.vault.db import open_database

UNENCRYPTED_WARNING = (
    "the replica store is NOT encrypted (--no-encrypt): the replicated disks are readable by "
    "anyone who can read the store"
)


def init_workdir(
    settings: Settings,
    *,
    encrypted: bool = True,
    passphrase: str | None = None,
    pki: bool = True,
) -> ReplicaStore:
    """Create the store, its key file, the vault database and (with ``pki``) the vault's CA.

    A bad store URL is refused before anything is created. ``passphrase`` keeps a
    passphrase-wrapped copy of the keys in the store. Returns the opened store.
    """
    from siterecovery.api.tls import ensure_pki  # cryptography: only when asked for

    open_backend(settings.store_url)
    private_dir(settings.workdir)
    keys = StoreKeys.generate()
    store = ReplicaStore.init(settings.store_url, keys, encrypted=encrypted, passphrase=passphrase)
    keys.save(settings.key_file)
    open_database(settings.vault_url).close()
    if pki:
        ensure_pki(settings.pki_dir)
    settings.save()
    return store
