//! gRPC definitions between the control plane and host agents.
