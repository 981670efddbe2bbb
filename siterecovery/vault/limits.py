"""The vault's bounds on what callers send it, in one place.

Every value here is checked before anything is written, so one caller can neither fill the
database nor store something that breaks the listings everyone else reads:

- a **free-form JSON field** (a VM's config, a task's details, a cycle's figures, hand-off
  details) is at most :data:`MAX_JSON_DEPTH` containers deep and :data:`MAX_JSON_BYTES` long
  serialized (compact, UTF-8); a field that merges reports (task details) is bounded after
  the merge;
- a **request body** is at most :data:`MAX_BODY_BYTES` by default (``VaultOptions``,
  ``vault serve --max-body``) and at most :data:`MAX_BODY_DEPTH` deep, both checked before
  it is parsed;
- a **time** a host reports (a recovery point's ``created_at``) is no earlier than the VM's
  protection start and no later than the vault's now, each widened by :data:`CLOCK_SKEW_S`
  for the hosts' clocks.
"""

from __future__ import annotations

#: Deepest nesting of a free-form JSON field: ``{}`` is 1, ``{"a": {"b": 1}}`` is 2.
MAX_JSON_DEPTH = 16
#: Longest serialized form of a free-form JSON field, in bytes.
MAX_JSON_BYTES = 64 * 1024
#: Default longest request body, in bytes.
MAX_BODY_BYTES = 1 << 20
#: Deepest nesting of a whole request body (its free-form fields sit a few levels down).
MAX_BODY_DEPTH = MAX_JSON_DEPTH + 8
#: How far a host's clock may be off the vault's, in seconds.
CLOCK_SKEW_S = 300
