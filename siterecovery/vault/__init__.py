"""siterecovery.vault"""
