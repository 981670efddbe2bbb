"""Alembic migrations of the vault schema (a package so env.py ships with it)."""
