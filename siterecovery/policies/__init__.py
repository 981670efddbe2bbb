"""Pure policies below every layer that applies them (STYLE §8).

Nothing here touches a database, a hypervisor or a store; the clock is always an argument.

- :mod:`~siterecovery.policies.states` — the replicated VM's state machine (DESIGN §4),
  health, the resync window;
- :mod:`~siterecovery.policies.schedule` — what is due for a VM and when (cycle, retry,
  resync), app-consistent frequency, bandwidth by time of day, the change-log threshold;
- :mod:`~siterecovery.policies.retry` — the classification of replication errors and the
  seed's backoff schedule, and where a failure moves a VM.

The vault (:mod:`siterecovery.vault`) and the services (:mod:`siterecovery.replication`,
:mod:`siterecovery.recovery`) both import these; these import neither.
"""
