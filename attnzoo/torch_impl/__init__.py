"""PyTorch implementations of the kernels' algorithms, for CPU tensors without the Triton interpreter.

Each mirrors a module of attnzoo/kernels/ (same block choice, same math) with the same signature.
"""
