"""The versioned adapter store. Importing this package must not import torch."""
