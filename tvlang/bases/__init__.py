"""Task vector bases (Zhang et al.): an application of the run and io layers.

``gram`` computes the similarity matrix of many task vectors in one streaming
pass, ``clustering`` groups them (spectral clustering, k from the eigengap), and
``build`` merges each group into a basis and applies stored bases. The names
below are the public ones (``tvlang.bases.similarity`` and friends, as in 0.2).
"""

from tvlang.bases.build import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MERGE_METHODS,
    Against,
    BasisRecipe,
    TaskVectorInput,
    against_bases,
    build_bases,
    inspect_inputs,
    load_manifest,
    recipe_for,
)
from tvlang.bases.clustering import (
    Clustering,
    affinity_matrix,
    cluster,
    eigengap_k,
    laplacian_eigenvalues,
    require_sklearn,
)
from tvlang.bases.gram import DEFAULT_CHUNK_BYTES, Similarity, format_matrix, similarity

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MERGE_METHODS",
    "Against",
    "BasisRecipe",
    "Clustering",
    "Similarity",
    "TaskVectorInput",
    "affinity_matrix",
    "against_bases",
    "build_bases",
    "cluster",
    "eigengap_k",
    "format_matrix",
    "inspect_inputs",
    "laplacian_eigenvalues",
    "load_manifest",
    "recipe_for",
    "require_sklearn",
    "similarity",
]
