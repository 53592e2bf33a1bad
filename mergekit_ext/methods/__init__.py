"""One module per method family: pure tensor kernels plus their mergekit declaration."""
