"""``python -m siterecovery``: the same as the ``siterecovery`` command."""

from siterecovery.cli.app import main

main()
