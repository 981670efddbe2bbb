"""siterecovery.replication"""
