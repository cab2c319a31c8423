"""The data: image sources, splits and split files, shards, augmented views and the streams the two stages read."""
