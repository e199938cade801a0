"""Re-sealing every stored sealed secret with the newest seal key (``accessflow keys rotate``).

A seal key is rotated in three steps: put the new key first in ``ACCESSFLOW_SEAL_KEY``, keeping
the old ones after it (new secrets are sealed with it at once, old ones still open); run
``accessflow keys rotate``, which re-seals every secret the newest key cannot open yet; then
drop the old keys from the setting. Only v1 credentials keep a sealed secret, and only until
their first reveal, so there are few.

Each batch is one short transaction. A row is updated only if it still holds the token that
was read (a reveal in between erased it, and stays erased), so the command can run while the
workers do, can be stopped at any point, and run again: a second run finds nothing to do.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from infra.credentials.sealing import FernetSealer, SealKeyMissing
from infra.db import orm

#: Rows read, re-sealed and written per transaction.
BATCH_SIZE = 500

_credentials = orm.credentials


@dataclass(frozen=True)
class ResealReport:
    #: Secrets sealed again with the newest key by this run.
    resealed: int
    #: Secrets the newest key already opened.
    current: int
    #: Ids of credentials whose secret no configured key opens: left as they are.
    unopenable: tuple[str, ...]


def reseal_all(engine: Engine, sealer: FernetSealer, *, batch_size: int = BATCH_SIZE) -> ResealReport:
    """Re-seal, in batches of ``batch_size`` ordered by id, every sealed secret with the newest key.

    Returns:
      What was done: see :class:`ResealReport`. A secret no configured key opens is
      counted there and left untouched, never erased.
    """
    resealed = current = 0
    unopenable: list[str] = []
    after = ""
    while True:
        with engine.begin() as connection:
            rows = connection.execute(
                sa.select(_credentials.c.id, _credentials.c.sealed_secret)
                .where(_credentials.c.sealed_secret.is_not(None), _credentials.c.id > after)
                .order_by(_credentials.c.id)
                .limit(batch_size)
            ).all()
            for credential_id, sealed in rows:
                try:
                    fresh = sealer.reseal(bytes(sealed))
                except SealKeyMissing:
                    unopenable.append(credential_id)
                    continue
                if fresh is None:
                    current += 1
                    continue
                written = connection.execute(
                    _credentials.update()
                    .where(_credentials.c.id == credential_id, _credentials.c.sealed_secret == sealed)
                    .values(sealed_secret=fresh)
                )
                resealed += written.rowcount
        if len(rows) < batch_size:
            return ResealReport(resealed=resealed, current=current, unopenable=tuple(unopenable))
        after = rows[-1].id
