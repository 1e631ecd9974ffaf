"""Optional integrations with other libraries, on secorder's public API.

* :mod:`secorder.integrations.laplace`: curvature backends for laplace-torch
  (``SecorderGGN``, ``SecorderEF``, ``SecorderHessian``); laplace-torch is imported
  only when one of them is first used.
"""
