"""Shared machinery of the structural steps (prune, lowrank, cluster, cleanup): what they record
about each layer, the exact-count magnitude masks, Conv input unfolding, and the channel-dependency
analysis that lets channel pruning shrink tensors consistently."""
