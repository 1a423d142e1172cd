"""Checkpoint loading and the networks (UNet, CLIP text encoder, VAE)."""
