"""Core second-order operations (legacy ``torch_secorder.core``)."""
