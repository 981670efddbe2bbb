"""The agent: one process per host that takes work from the vault and moves data (DESIGN §2).

- :mod:`~siterecovery.agent.config` — its configuration, credential, pinned CA, key files;
- :mod:`~siterecovery.agent.runner` — ``register`` and the :class:`Agent` poll loop;
- :mod:`~siterecovery.agent.tasks` — what it runs for claimed work, reported over the API.
"""
