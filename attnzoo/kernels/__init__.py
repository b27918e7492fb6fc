"""Triton kernels. They take tensors, strides and index lists, and know no method or API object."""
