"""The Zarr store: its schema, its writer and its reader."""
