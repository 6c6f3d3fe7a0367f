"""The trained encoder and decoder as a Hugging Face model: the VAEGAN class, its files and its card."""
