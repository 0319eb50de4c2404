//! Snapshot builds: the generational header format, the on-disk build store, diffs and integrity checks.
