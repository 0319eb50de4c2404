//! The control plane: REST API, store, auth, scheduler, reconciler, TTLs.
