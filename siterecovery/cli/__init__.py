"""siterecovery.cli"""
