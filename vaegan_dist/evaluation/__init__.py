"""How good the networks are: the MNIST classifier's metrics, pictures and the run report."""
