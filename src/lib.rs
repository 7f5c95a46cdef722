//! Portcullis: an LLM security gateway on Pingora.
//!
//! This crate does the I/O: the Pingora service, provider calls, SSE relay,
//! the admin listener, audit sinks, configuration and the CLI. Every
//! decision is made in the `filters` crate.

#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_cli;
pub mod audit;
pub mod cli;
pub mod config;
pub mod dialect;
pub mod eval;
pub mod guard_client;
pub mod http_server;
pub mod keys;
pub mod metrics;
pub mod mock;
pub mod proxy;
pub mod redis_limits;
pub mod registry;
pub mod server;
pub mod upstream;
