"""The images: MNIST's files, a folder's, their labels, and each process's batches of each epoch."""
