//! What stands in for the world in the demo, the tests and the load
//! tests: the mock provider ([`mock`]), the dev key pair and its tokens
//! ([`dev_keys`]), and the demo ([`demo`]).

pub mod demo;
pub mod dev_keys;
pub mod mock;
