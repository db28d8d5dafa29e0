"""mergekit 0.1.5's merge methods: the table the config is resolved against, and the
methods that have no tvlang operator yet."""

from __future__ import annotations

from tvlang.frontends.mergekit.geometric import GEOMETRIC_METHODS
from tvlang.frontends.mergekit.gta import GTA_METHODS
from tvlang.frontends.mergekit.linear import LINEAR_METHODS
from tvlang.frontends.mergekit.selection import SELECTION_METHODS
from tvlang.frontends.mergekit.spec import _Method

_METHODS: dict[str, _Method] = {m.name: m for m in (*LINEAR_METHODS, *GEOMETRIC_METHODS, *GTA_METHODS,
                                                  *SELECTION_METHODS)}

# mergekit methods with no tvlang operator yet (docs/mergekit.md, "Not supported yet").
_NO_OPERATOR: tuple[str, ...] = ()
