//! `ember-guest`: PID 1 of every Ember guest. (Being built: see issue 2.)

fn main() {}
