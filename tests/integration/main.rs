//! Integration tests: the real gateway binary against the mock provider.

mod admin;
mod anthropic;
mod approvals;
mod audit;
mod auth;
mod cli;
mod faults;
mod guard;
mod hostile;
mod image;
mod injection;
mod limits;
mod observability;
mod proxy;
mod redaction;
mod redis;
mod rejections;
mod streaming;
mod support;
mod sweep;
mod tls;
mod tools;
mod tracing;
