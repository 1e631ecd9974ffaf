"""Kronecker-factored curvature: K-FAC and EK-FAC as transforms (``so.kfac``, ``so.ekfac``).

Layout (one idea per module):

* :mod:`~secorder.kronecker.layers`: the layers K-FAC understands, one rule per torch
  function (``F.linear``, ``F.conv1d/2d/3d``, ``F.embedding``) in a registry;
* :mod:`~secorder.kronecker.record`: one forward pass that records those layer calls
  (a thread-local torch-function mode: no hooks on the user's modules);
* :mod:`~secorder.kronecker.columns`: the output vectors each ``fisher_type``
  backpropagates;
* :mod:`~secorder.kronecker.collect`: one batch's factor sums and EK-FAC corrections;
* :mod:`~secorder.kronecker.compute`: a call or a data set (batches, ranks) to ``K``;
* :mod:`~secorder.kronecker.blocks` and :mod:`~secorder.kronecker.result`: ``K`` and its
  linear algebra (products, exact-damped solves, diagonal, trace, log-determinant,
  eigenvalues, inverse);
* :mod:`~secorder.kronecker.operator`: ``curvature="kfac"`` / ``"ekfac"`` for every
  transform of secorder.
"""

from .operator import kfac_curvature
from .result import KroneckerCurvature
from .transform import ekfac, kfac

__all__ = ["kfac", "ekfac", "KroneckerCurvature", "kfac_curvature"]
