"""siterecovery.store"""
