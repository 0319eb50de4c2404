//! QEMU `-M microvm` backend. (Being built: see issue 2.)
