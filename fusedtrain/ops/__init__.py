"""One module per op family: validation, backend dispatch, fake kernels, autograd."""
