"""What needs an NVIDIA GPU (marker `gpu`); skipped, saying so, where there is none."""
