"""Install the peer packages for the benchmarks without touching the local torch.

``backpack-for-pytorch`` declares a dependency on ``torchvision`` (used only by its
examples), and a PyPI torchvision would replace the installed torch. So the
peers are installed with ``--no-deps`` after their real dependencies (the
``bench`` extra). ``torch-secorder==0.0.1`` shares its import name with our shim:
it goes into its own target folder, see :func:`benchmarks.harness.peer_path`.

The tests compare against these peers where they are installed (K-FAC against
curvlinops, the laplace-torch backends against its BackPACK and curvlinops
backends, the structured engine against BackPACK): CI installs them this way.

Run: ``pip install -e ".[bench]" && python -m benchmarks.install_peers``
"""

import subprocess
import sys

from benchmarks import harness

PEERS = ["backpack-for-pytorch==1.7.1", "curvlinops-for-pytorch==3.0.1", "pyhessian==0.1",
         # laplace-torch 0.3 (the secorder backends' tests compare with its BackPACK and curvlinops backends)
         # and the pure-Python packages it imports; its own dependencies would pull torchvision
         "laplace-torch==0.3", "asdfghjkl==0.1a4", "torchmetrics==1.9.0", "lightning-utilities==0.15.3"]


def main() -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *PEERS], check=True)
    for name in harness.ISOLATED_PEERS:
        print("isolated peer at", harness.peer_path(name))


if __name__ == "__main__":
    main()
