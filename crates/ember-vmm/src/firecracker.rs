//! Firecracker backend. (Being built: see issue 3.)
