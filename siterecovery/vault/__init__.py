"""The vault: desired state, jobs and health of replicated VMs (DESIGN §1, §4).

Modules:

- :mod:`~siterecovery.vault.db` — ``open_database(url)`` (SQLite or PostgreSQL, migrations
  run at open), transactions, the injectable clock;
- :mod:`~siterecovery.vault.service` — every operation, as plain functions taking the
  database and keyword arguments, returning frozen records;
- :mod:`~siterecovery.policies.states` — pure rules: transition table, health, resync window;
- :mod:`~siterecovery.vault.records` — what the service returns;
- :mod:`~siterecovery.vault.models` — the SQLAlchemy tables (internal to the vault);
- :mod:`~siterecovery.vault.errors` — the vault's exception tree.
"""

from siterecovery.vault.db import Clock, Database, open_database, utc_now

__all__ = ["Clock", "Database", "open_database", "utc_now"]
