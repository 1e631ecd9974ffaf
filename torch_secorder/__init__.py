"""Legacy closure-based API of ``torch_secorder``, reproduced on secorder's engine."""
