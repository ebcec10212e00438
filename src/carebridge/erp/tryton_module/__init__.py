"""carebridge's Tryton module: a unique external key on every document carebridge posts.

trytond loads this package through the ``trytond.modules`` entry point
``carebridge``; carebridge itself never imports it. Each model below gains
``external_ref``, unique per company, which carebridge fills with the
delivery's idempotency key. A second create with the same key fails with a
``UserError``, so a retry, a replay or a resent message cannot post twice.
Copies (for example the reversal made by the ``account.move.cancel``
wizard) get no key.
"""
