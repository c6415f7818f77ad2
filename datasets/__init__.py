"""Data shipped with gcrf (no code): VOC clicks, the ScribbleSup and ACDC (WSL4MIS) manifests."""
