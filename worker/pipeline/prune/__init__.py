"""The ``prune`` step's work beyond its entry module (worker/pipeline/steps/prune.py): the
exact-count magnitude masks, channel pruning (the channel-dependency analysis that shrinks tensors
consistently, attention heads as channel groups) and the least-squares compensation of the layers
that lose inputs. Helpers other structural steps share (records, Hessians, Conv unfolding) live
beside ``graph.py``."""
