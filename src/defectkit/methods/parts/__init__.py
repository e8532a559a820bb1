"""Small named parts that methods are built from: resizing, patch embedding,
memory sampling, nearest-neighbour search and map post-processing."""
