//! The `ember` binary. (Being built: see issue 2.)

fn main() {}
