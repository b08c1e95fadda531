"""The CogVideoX networks: the expert transformer and the 3D causal VAE."""
