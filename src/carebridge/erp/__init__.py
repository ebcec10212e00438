"""Tryton as carebridge's ERP: a JSON-RPC client, database set-up and a server runner.

Nothing here imports trytond. carebridge talks to Tryton over its HTTP
JSON-RPC interface only. The Tryton module in :mod:`carebridge.erp.tryton_module`
is loaded by trytond itself, never by carebridge.
"""
