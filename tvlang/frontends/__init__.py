"""Front ends: other tools' merge configs translated into tvlang recipes.

A front end does not run anything itself: it writes a ``.tv`` recipe, which is then
checked, explained, optimized and streamed like any recipe (docs/mergekit.md).

- :mod:`tvlang.frontends.mergekit`: a mergekit YAML config (``mergekit-yaml``'s input).
"""
