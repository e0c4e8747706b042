"""Generated data for demonstrations and benchmarks: a French hospital group, written through the store's normal path."""
