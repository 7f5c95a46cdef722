//! Portcullis: an LLM security gateway on Pingora.
//!
//! This crate does the I/O: the Pingora service, provider calls, SSE relay,
//! the admin listener, audit sinks, configuration and the CLI. Every
//! decision is made in the `filters` crate.

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod http_server;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod stores;
pub mod testkit;
pub mod trace;
pub mod upstream;
