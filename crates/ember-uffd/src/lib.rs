//! The userfaultfd page server that restores Firecracker VMs lazily from snapshot builds.
