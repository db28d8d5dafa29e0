"""Spectral clustering of task vectors by their cosine similarity (Zhang et al.).

Clustering (needs the ``bases`` extra, scikit-learn) works on the affinity
``max(cos, 0)``: anti-correlated task vectors are treated as unrelated, never
as similar (see docs/bases.md).

>>> cos = np.array([[1.0, 0.9, 0.0], [0.9, 1.0, 0.1], [0.0, 0.1, 1.0]])
>>> k, eigenvalues = eigengap_k(affinity_matrix(cos))
>>> k
2
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tvlang.errors import TvlangError

__all__ = ["Clustering", "affinity_matrix", "cluster", "eigengap_k", "laplacian_eigenvalues", "require_sklearn"]

# A normalized-Laplacian eigenvalue below this is a connected component of its own.
ZERO_EIGENVALUE = 1e-9
INSTALL_HINT = "install the 'bases' extra: pip install tvlang[bases]"


@dataclass
class Clustering:
    """Spectral clustering of N task vectors into k groups.

    ``clusters`` lists member indices per cluster, clusters ordered by their
    first member and members in input order (so labels do not depend on the
    k-means initialisation). ``eigenvalues`` are those of the normalized
    Laplacian of the affinity, ascending.
    """

    k: int
    labels: list[int]
    clusters: list[list[int]]
    eigenvalues: list[float]
    k_auto: int

    def order(self) -> list[int]:
        """Input indices grouped by cluster (for an ordered heatmap)."""
        return [i for members in self.clusters for i in members]


def affinity_matrix(cosine: np.ndarray) -> np.ndarray:
    """``max(cos, 0)`` with a unit diagonal: the graph spectral clustering cuts.

    Negative cosines are clipped to 0: an anti-correlated pair is as unrelated
    as an orthogonal one, so it never ends up in one basis (where a mean would
    cancel it). A zero task vector keeps its self-loop and forms its own cluster.

    >>> affinity_matrix(np.array([[1.0, -0.8], [-0.8, 1.0]])).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    a = np.clip(np.asarray(cosine, dtype=np.float64), 0.0, 1.0)
    a = (a + a.T) / 2
    np.fill_diagonal(a, 1.0)
    return a


def laplacian_eigenvalues(affinity: np.ndarray) -> np.ndarray:
    """Eigenvalues, ascending, of ``L = I - D^-1/2 A D^-1/2`` (in [0, 2])."""
    degree = affinity.sum(axis=1)
    inv_sqrt = 1.0 / np.sqrt(degree)
    lap = np.eye(len(affinity)) - inv_sqrt[:, None] * affinity * inv_sqrt[None, :]
    values = np.linalg.eigvalsh((lap + lap.T) / 2)
    return np.clip(values, 0.0, 2.0)


def eigengap_k(affinity: np.ndarray) -> tuple[int, list[float]]:
    """k from the largest gap between consecutive Laplacian eigenvalues.

    ``k = argmax_i (lambda_{i+1} - lambda_i)`` over i = 1..N-1 (1-based), raised
    to the number of (numerically) zero eigenvalues, which is the number of
    connected components: N unrelated task vectors give k = N.
    """
    values = laplacian_eigenvalues(affinity)
    n = len(values)
    if n == 1:
        return 1, [float(values[0])]
    gaps = np.diff(values)
    k = int(np.argmax(gaps)) + 1
    components = int(np.sum(values < ZERO_EIGENVALUE))
    return max(k, components), [float(v) for v in values]


def require_sklearn():
    try:
        import sklearn.cluster  # noqa: F401
    except ImportError:
        raise TvlangError(f"clustering needs scikit-learn; {INSTALL_HINT}") from None
    return sklearn.cluster


def cluster(cosine: np.ndarray, k: int | str = "auto", *, random_state: int = 0) -> Clustering:
    """Spectral clustering (Ng et al. 2001, scikit-learn) of a cosine matrix.

    ``k="auto"`` takes k from the largest eigengap (``eigengap_k``). The result
    is deterministic: fixed ``random_state``, clusters numbered by first member.
    """
    cosine = np.asarray(cosine, dtype=np.float64)
    n = cosine.shape[0]
    affinity = affinity_matrix(cosine)
    k_auto, eigenvalues = eigengap_k(affinity)
    if k == "auto":
        k_used = k_auto
    else:
        k_used = int(k)
        if not 1 <= k_used <= n:
            raise TvlangError(f"--k {k_used} is out of range: there are {n} task vectors (1 <= k <= {n})")
    if k_used == 1:
        raw = [0] * n
    elif k_used == n:
        raw = list(range(n))
    else:
        skc = require_sklearn()
        import warnings

        model = skc.SpectralClustering(
            n_clusters=k_used, affinity="precomputed", random_state=random_state,
            assign_labels="kmeans", n_init=10,
        )
        with warnings.catch_warnings():
            # "Graph is not fully connected": expected when clusters share nothing.
            warnings.simplefilter("ignore", UserWarning)
            raw = [int(x) for x in model.fit_predict(affinity)]
    renumber: dict[int, int] = {}
    labels = [renumber.setdefault(label, len(renumber)) for label in raw]
    clusters = [[i for i in range(n) if labels[i] == c] for c in range(len(renumber))]
    return Clustering(k=len(clusters), labels=labels, clusters=clusters, eigenvalues=eigenvalues, k_auto=k_auto)
