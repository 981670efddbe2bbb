"""siterecovery.recovery"""
