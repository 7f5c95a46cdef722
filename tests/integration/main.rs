//! Integration tests: the real gateway binary against the mock provider.

mod audit;
mod cli;
mod proxy;
mod rejections;
mod streaming;
mod support;
mod tls;
